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

import pyarrow as pa

from kd.stages import datasets_io
from kd.stages.schemas import KINDS


def dataset_problems(directory: Path, hashes: bool = True, read_parts: bool = True) -> list[str]:
    """What is wrong with one dataset directory (empty: it verifies).

    `read_parts=False` skips opening the Arrow parts for their schema and rows: a stage checking its
    inputs reads them right after, and with matching sha256 they are the bytes kd wrote."""
    manifest = datasets_io.read_manifest(directory)
    if manifest is None:
        return ["no valid manifest.json (an incomplete or foreign directory)"]
    kind = KINDS.get(manifest["kind"])
    if kind is None:
        return [f"unknown dataset kind {manifest['kind']!r}"]
    problems = []
    if manifest["schema_version"] != kind.version:
        problems.append(f"schema version {manifest['schema_version']}, this kd reads {kind.version}")
    listed = {entry["path"] for entry in manifest["files"]}
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} - {datasets_io.MANIFEST}
    problems += [f"{path}: not in the manifest" for path in sorted(present - listed)]
    rows = 0
    for entry in manifest["files"]:
        path = directory / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
            continue
        if path.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['path']}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
            continue
        if hashes and datasets_io.sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from the manifest")
            continue
        if path.suffix == ".arrow" and read_parts:
            try:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_file(source).read_all()
            except (pa.ArrowInvalid, OSError) as err:
                problems.append(f"{entry['path']}: unreadable Arrow ({err})")
                continue
            if not table.schema.equals(kind.schema):
                problems.append(f"{entry['path']}: schema differs from {kind.name} v{kind.version}")
            rows += table.num_rows
    if read_parts and kind.schema is not None and rows != manifest["rows"] and not problems:
        problems.append(f"{rows} rows in the parts, manifest says {manifest['rows']}")
    for source in manifest["inputs"]:
        path = Path(source["path"])
        if not (path / datasets_io.MANIFEST).is_file():
            problems.append(f"input {path}: missing")
        elif datasets_io.manifest_hash(path) != source["manifest_sha256"]:
            problems.append(f"input {path}: changed since this dataset was made from it")
    return problems


def run(run_dir: Path, hashes: bool = True) -> dict:
    """{dataset directory: problems} for every dataset of the run, plus timing."""
    started = time.perf_counter()
    results = {}
    for directory in sorted(Path(run_dir).glob("[0-9][0-9][0-9][0-9]/*")):
        if directory.is_dir() and not directory.name.startswith("."):
            results[str(directory)] = dataset_problems(directory, hashes)
    return {"datasets": results, "seconds": time.perf_counter() - started}
