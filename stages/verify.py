"""verify: re-check every dataset of a run against its manifest, and the provenance chain.

    kd verify runs/toy

For each dataset directory: the manifest parses and names a known kind and this kd's schema
version; every listed file exists with the recorded size and sha256 and no unlisted file is there;
Arrow parts carry the declared schema and add up to the recorded row count; and each recorded
input's manifest still hashes to what the dataset recorded (so rollouts -> scored -> train ->
adapter -> next rollouts is one unbroken chain from the prompts to the last adapter). A dataset
that retention removed (kd.stages.retention) is listed as pruned; the datasets made from it check
their recorded input hash against the manifest hash recorded when it was removed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kd.stages import datasets_io


def run(run_dir: Path, hashes: bool = True) -> dict:
    """{"datasets": {directory: problems} for every dataset of the run, "pruned": the directories
    retention removed, "seconds"}."""
    started = time.perf_counter()
    results = {}
    for directory in sorted(Path(run_dir).glob("[0-9][0-9][0-9][0-9]/*")):
        if directory.is_dir() and not directory.name.startswith("."):
            problems = datasets_io.dataset_problems(directory, hashes)
            if not (problems and datasets_io.pruned_record(directory) and not directory.is_dir()):  # removed meanwhile
                results[str(directory)] = problems
    pruned = [str(record.parent / name) for record in sorted(Path(run_dir).glob(f"[0-9][0-9][0-9][0-9]/{datasets_io.PRUNED}"))
              for name in json.loads(record.read_text()) if str(record.parent / name) not in results]
    return {"datasets": results, "pruned": pruned, "seconds": time.perf_counter() - started}
