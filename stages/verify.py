"""verify: re-check every dataset of a run against its manifest, and the provenance chain.

    kd verify runs/toy

For each dataset directory: the manifest parses and names a known kind and this kd's schema
version; every listed file exists with the recorded size and sha256 and no unlisted file is there;
Arrow parts carry the declared schema and add up to the recorded row count; and each recorded
input's manifest still hashes to what the dataset recorded (so rollouts -> scored -> train ->
adapter -> next rollouts is one unbroken chain from the prompts to the last adapter).
"""

from __future__ import annotations

import time
from pathlib import Path

from kd.stages import datasets_io


def run(run_dir: Path, hashes: bool = True) -> dict:
    """{dataset directory: problems} for every dataset of the run, plus timing."""
    started = time.perf_counter()
    results = {}
    for directory in sorted(Path(run_dir).glob("[0-9][0-9][0-9][0-9]/*")):
        if directory.is_dir() and not directory.name.startswith("."):
            results[str(directory)] = datasets_io.dataset_problems(directory, hashes)
    return {"datasets": results, "seconds": time.perf_counter() - started}
