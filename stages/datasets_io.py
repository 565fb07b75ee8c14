"""Dataset I/O: zstd Arrow parts, manifests, atomic directories, and prompt files.

A stage writes into a hidden staging directory beside its target and renames it into place when
done, manifest last. A directory without a valid manifest.json does not exist for any reader, so a
killed stage leaves nothing that a later run mistakes for output, and re-running redoes it.

    pl.scan_ipc("runs/toy/0000/scored/*.arrow")                     # inspect with polars
    load_dataset("arrow", data_files="runs/toy/0000/scored/*.arrow")  # or with datasets

Also here: the on-disk format of sharded datasets (parts and their markers, which kd.stages.shards
writes), the verification of a dataset against its manifest (inputs are checked before a stage
reads them; `kd verify` checks a whole run), and `stable_hash`, the hash of a stage's config.
Torch-free.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from kd.stages import __version__, pipeline
from kd.stages.errors import KdError
from kd.stages.schemas import KINDS, DatasetKind

MANIFEST = "manifest.json"
MARKERS = "_shards"  # a sharded dataset's per-shard markers (kd.stages.shards writes them)
PRUNED = "pruned.json"  # per epoch directory: what retention removed there (kd.stages.retention)
# Stages verify their inputs (sizes, sha256, rows, schema, provenance) before reading them;
# `kd --no-verify ...` turns that off for the impatient.
VERIFY_INPUTS = True


def part_name(shard: int, num_shards: int) -> str:
    return f"part-{shard:05d}-of-{num_shards:05d}.arrow"


@contextlib.contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A fresh hidden directory beside `target`, renamed onto it only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        if not pid_alive(int(stale.name.split("-")[-2])):  # staged by a writer that was killed
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fault_point(target, "staged")
        if target.exists():  # an earlier, incomplete attempt (no manifest): never mistaken for output
            shutil.rmtree(target)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


FAULT_POINTS = ("start", "files", "manifest", "staged")
# Set by kd's SIGTERM handler (kd.cli.main), which also raises SystemExit. That exception is lost
# when the signal lands inside a finaliser or a callback whose exceptions Python only prints, and
# the process then works on: every commit point below checks this too, so a terminated process
# never publishes output (seen as a cancelled Slurm array task that still wrote its shard).
TERMINATED = threading.Event()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fault_point(target: Path, point: str) -> None:
    """Fault injection for the kill-and-resume tests: KD_FAULT_KILL=0001/scored:staged SIGKILLs this
    process at that point of writing <run>/0001/scored. Points: start (the stage begins its work),
    files (parts written, nothing else), manifest (manifest written beside its final name),
    staged (complete, not yet renamed into place), train's checkpoint (adapter saved,
    optimiser state not yet), and pruned (retention recorded the dataset's removal, not yet done). Every rename that publishes output passes a point first; a process
    that was sent SIGTERM exits there (TERMINATED)."""
    if TERMINATED.is_set():
        sys.exit(143)
    if os.environ.get("KD_FAULT_KILL") == f"{target.parent.name}/{target.name}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_table(path: Path, table: pa.Table, kind: DatasetKind) -> None:
    """One zstd-compressed Arrow IPC file with the declared schema (cast, never inferred)."""
    table = table.cast(kind.schema)
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, kind.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=8192)


def write_dataset(
    out: Path,
    kind: DatasetKind,
    table: pa.Table | None,
    stage_config: dict[str, Any],
    inputs: list[Path],
    stats: dict[str, Any],
    started: float,
    write_files: Callable[[Path], None] | None = None,
) -> dict:
    """Write one complete dataset directory atomically: Arrow part, extra files, manifest last."""
    with staging_dir(out) as tmp:
        if table is not None:
            write_table(tmp / part_name(0, 1), table, kind)
        fault_point(out, "files")
        if write_files is not None:
            write_files(tmp)
        rows = table.num_rows if table is not None else 0
        return write_manifest(
            tmp, kind, rows, stage_config, stable_hash(stage_config), inputs, stats, time.time() - started, out
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(
    directory: Path,
    kind: DatasetKind,
    rows: int,
    config: dict[str, Any],
    config_hash: str,
    inputs: list[Path],
    stats: dict[str, Any],
    wall_seconds: float,
    target: Path | None = None,
) -> dict:
    """Describe every file already in `directory`; written last, it marks the dataset complete.
    `target`: the final place of a staged `directory` (names its fault-injection point).
    `wall_seconds`: the stage's time; for a sharded dataset the sum over its shards (worker seconds)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "kind": kind.name,
        "schema_version": kind.version,
        "rows": rows,
        "files": [
            {"path": str(p.relative_to(directory)), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in files
        ],
        "config": config,
        "config_hash": config_hash,
        "inputs": [{"path": str(path), "manifest_sha256": manifest_hash(path)} for path in inputs],
        "kd_version": __version__,
        "wall_seconds": round(wall_seconds, 3),
        "stats": stats,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=float))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if target is not None:
        fault_point(target, "manifest")
    os.rename(tmp, directory / MANIFEST)
    return manifest


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a complete dataset, or None when there is none (or it is unreadable)."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "kind" in manifest else None


def manifest_hash(directory: Path) -> str:
    return sha256_file(Path(directory) / MANIFEST)


def pruned_record(directory: Path) -> dict | None:
    """What retention recorded of dataset `directory` when it removed it (kind, rows, bytes and its
    manifest's sha256, which the datasets made from it still check), or None: it was not pruned."""
    try:
        record = json.loads((Path(directory).parent / PRUNED).read_text())
    except (OSError, ValueError):
        return None
    return record.get(Path(directory).name) if isinstance(record, dict) else None


def pruned_message(directory: Path) -> str:
    return (f"{directory}: removed by retention (keep_epochs; recorded in {Path(directory).parent / PRUNED}) once "
            "every stage of the run that reads it had finished; what needs it again needs a run that keeps it "
            "(a larger keep_epochs, or 0 to keep every epoch)")


def is_complete(directory: Path) -> bool:
    """The stage writing `directory` finished: its manifest is there, or retention has since removed
    the dataset (pruned_record), so no stage redoes it."""
    return read_manifest(directory) is not None or pruned_record(directory) is not None


def require(directory: Path, kind: DatasetKind, hint: str) -> dict:
    """The manifest of an input dataset, or a one-line error saying what to run first."""
    manifest = read_manifest(directory)
    if manifest is None and pruned_record(directory) is not None:
        raise KdError(pruned_message(directory))
    if manifest is None:
        raise KdError(missing_message(Path(directory), kind.name) or f"{directory}: no complete {kind.name} dataset here; {hint}")
    if manifest["kind"] != kind.name:
        raise KdError(f"{directory}: holds a {manifest['kind']} dataset, expected {kind.name}")
    if manifest["schema_version"] != kind.version:
        raise KdError(
            f"{directory}: {kind.name} schema version {manifest['schema_version']}, this kd reads version "
            f"{kind.version}; regenerate it with this kd version"
        )
    if VERIFY_INPUTS:
        problems = dataset_problems(Path(directory), read_parts=False)
        if problems:
            raise KdError(
                f"{directory}: fails verification ({problems[0]}); delete it and re-run the stage that "
                "writes it, or pass --no-verify to use it anyway"
            )
    return manifest


def read_table(directory: Path, kind: DatasetKind, hint: str = "run the stage that writes it first") -> pa.Table:
    manifest = require(directory, kind, hint)
    return read_parts(directory, kind, sorted(f["path"] for f in manifest["files"] if f["path"].endswith(".arrow")))


def read_parts(directory: Path, kind: DatasetKind, parts: list[str]) -> pa.Table:
    """The named Arrow parts of `directory`, concatenated in the given order, schema checked."""
    tables = []
    for part in parts:
        with pa.memory_map(str(Path(directory) / part)) as source:
            table = pa.ipc.open_file(source).read_all()
        if not table.schema.equals(kind.schema):
            raise KdError(f"{Path(directory) / part}: schema differs from {kind.name} v{kind.version}; regenerate it")
        tables.append(table)
    return pa.concat_tables(tables) if tables else kind.schema.empty_table()


def kind_of(directory: Path) -> DatasetKind:
    manifest = read_manifest(directory)
    if manifest is None and pruned_record(directory) is not None:
        raise KdError(pruned_message(directory))
    if manifest is None or manifest["kind"] not in KINDS:
        raise KdError(f"{directory}: not a complete kd dataset (no valid {MANIFEST})")
    return KINDS[manifest["kind"]]


# ---- prompt files -------------------------------------------------------------------------------

def built_world(record: Path, config: dict, what: str, dir_field: str) -> dict | None:
    """The record of a world (`kd toy`, `kd real`) already built from `config`, None if none is there;
    a one-line error if one built from another config is."""
    if not record.is_file():
        return None
    report = json.loads(record.read_text())
    if report["config"] != config:
        keys = [key for key in sorted(set(report["config"]) | set(config)) if report["config"].get(key) != config.get(key)]
        differ = ", ".join(f"{key} {json.dumps(report['config'].get(key))} -> {json.dumps(config.get(key))}" for key in keys)
        older = "; format: built by another version of kd" if "format" in keys else ""
        raise KdError(f"{record.parent}: a {what} built from another config is there ({differ}{older}); delete it to "
                      f"build it anew, or pick another {dir_field}")
    return report


def write_jsonl_zst(path: Path, rows: list[dict]) -> None:
    payload = "".join(json.dumps(row) + "\n" for row in rows).encode()
    Path(path).write_bytes(zstandard.ZstdCompressor(level=10).compress(payload))


def _unzstd(path: Path, raw: bytes) -> bytes:
    """All frames of a .zst file; a truncated last frame is an error, not silently fewer rows."""
    out = []
    try:
        while raw:
            frame = zstandard.ZstdDecompressor().decompressobj()
            out.append(frame.decompress(raw))
            if not frame.eof:
                raise zstandard.ZstdError("the file ends inside a frame")
            raw = frame.unused_data
    except zstandard.ZstdError as err:
        raise KdError(f"{path}: not a complete zstandard file ({err}); re-compress it") from None
    return b"".join(out)


def read_prompt_rows(path: str | Path) -> list[dict]:
    """Rows of a prompt file: JSONL, .jsonl.zst, Parquet, or a `datasets` directory saved to disk."""
    path = Path(path)
    if not path.exists():
        raise KdError(f"{path}: prompt file not found; pass an existing JSONL, .jsonl.zst, Parquet or datasets path")
    if path.is_dir():
        from datasets import load_from_disk

        return [dict(row) for row in load_from_disk(str(path))]
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    raw = path.read_bytes()
    if path.name.endswith(".zst"):
        raw = _unzstd(path, raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise KdError(f"{path}: byte {err.start} is not UTF-8; re-encode the file as UTF-8") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            raise KdError(f"{path}:{number}: invalid JSON ({err.msg}); fix or remove that line") from None
    return rows


def stable_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Sharded datasets (written by kd.stages.shards): parts and markers filling a directory in place.


def marker_name(shard: int, num_shards: int) -> str:
    return f"{shard:05d}-of-{num_shards:05d}.json"


def write_marker(out: Path, shard: int, num_shards: int, rows: int, wall_seconds: float) -> None:
    """The marker of a shard whose part is in place: size, sha256, rows, wall time; renamed into place."""
    part = out / part_name(shard, num_shards)
    marker = {
        "part": part.name, "rows": rows, "bytes": part.stat().st_size, "sha256": sha256_file(part),
        "wall_seconds": round(wall_seconds, 3), "host": os.uname().nodename,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = out / MARKERS / f".{marker_name(shard, num_shards)}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(marker, indent=2))
    fault_point(out, f"shard-{shard}:marker")
    os.rename(tmp, out / MARKERS / marker_name(shard, num_shards))


def read_markers(out: Path, num_shards: int) -> dict[int, dict]:
    """The complete shards of a num_shards layout: a marker whose part has the recorded size."""
    done = {}
    for shard in range(num_shards):
        try:
            marker = json.loads((out / MARKERS / marker_name(shard, num_shards)).read_text())
        except (OSError, ValueError):
            continue
        part = out / marker["part"]
        if part.is_file() and part.stat().st_size == marker["bytes"]:
            done[shard] = marker
    return done


def layouts(out: Path) -> list[int]:
    """The shard counts that markers in `out` were written for (normally one)."""
    return sorted({int(p.stem.split("-of-")[1]) for p in (out / MARKERS).glob("*-of-*.json")})


def missing_message(out: Path, kind_name: str) -> str | None:
    """Why a directory of shards is not a dataset yet, with the command that finishes it (None: no shards)."""
    stage = pipeline.by_output(kind_name)
    counts = layouts(out) if stage is not None and stage.shardable and out.is_dir() else []
    if not counts:
        return None
    command = f"kd {stage.command} --run {out.parent.parent.name} --epoch {int(out.parent.name)}"
    num_shards = counts[-1]
    teachers = shard_teachers(out, num_shards) if stage is pipeline.SCORE else [None]
    per_teacher = num_shards // len(teachers)

    def rerun(position: int) -> str:
        """The command that writes the dataset's shard `position` (a teacher's own shard with several)."""
        teacher, shard = teachers[position // per_teacher], position % per_teacher
        options = f" --teacher {teacher}" if teacher else ""
        return f"`{command}{options}" + (f" --shard {shard} --num-shards {per_teacher}`" if per_teacher > 1 else "`")

    missing = [s for s in range(num_shards) if s not in read_markers(out, num_shards)]
    if not missing:
        return (f"{out}: all {num_shards} shards are done but the manifest was never written (the task that "
                f"finished last was killed); re-run any of them, e.g. {rerun(0)}")
    shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
    return (f"{out}: {len(missing)} of {num_shards} shards missing ({shown}); run them, e.g. "
            f"{rerun(missing[0])} (or resubmit those array tasks)")


def shard_teachers(out: Path, num_shards: int) -> list[str | None]:
    """The teachers whose shards make up a scored dataset of `num_shards` (kd.stages.score), from its
    run's config.yaml; [None] for one teacher, or when the config cannot tell."""
    from kd.stages import config as config_lib  # the config imports this module

    try:
        names = list(config_lib.load(out.parent.parent / "config.yaml").teachers)
    except KdError:
        return [None]
    return names if len(names) > 1 and num_shards % len(names) == 0 else [None]


def dataset_problems(directory: Path, hashes: bool = True, read_parts: bool = True) -> list[str]:
    """What is wrong with one dataset directory (empty: it verifies).

    `read_parts=False` skips opening the Arrow parts for their schema and rows: a stage checking its
    inputs reads them right after, and with matching sha256 they are the bytes kd wrote."""
    manifest = read_manifest(directory)
    if manifest is None:
        return ["no valid manifest.json (an incomplete or foreign directory)"]
    kind = KINDS.get(manifest["kind"])
    if kind is None:
        return [f"unknown dataset kind {manifest['kind']!r}"]
    problems = []
    if manifest["schema_version"] != kind.version:
        problems.append(f"schema version {manifest['schema_version']}, this kd reads {kind.version}")
    listed = {entry["path"] for entry in manifest["files"]}
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} - {MANIFEST}
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
        if hashes and sha256_file(path) != entry["sha256"]:
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
        if not (path / MANIFEST).is_file():
            record = pruned_record(path)
            if record is None:
                problems.append(f"input {path}: missing")
            elif record["manifest_sha256"] != source["manifest_sha256"]:
                problems.append(f"input {path}: pruned, and the manifest recorded then is not the one this dataset was made from")
        elif manifest_hash(path) != source["manifest_sha256"]:
            problems.append(f"input {path}: changed since this dataset was made from it")
    return problems
