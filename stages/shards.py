"""Sharded stages: generate and score split one epoch's rows over N workers (SLURM array tasks).

    kd generate --epoch 3 --shard 1 --num-shards 4      # or, inside an array job, just: kd generate --epoch 3

Shard i of N takes the i-th contiguous block of the rows the unsharded stage would produce (the
chosen prompts for generate, the rollouts' rows for score). Which prompts are chosen and each
sample's seed depend on (seed, epoch, prompt, sample index) only, so the shards' union is the
unsharded dataset, row for row in the same order. (With several teachers each teacher has its own
N shards of the scored dataset, kd.stages.score: its rows are then in teacher order.)

On disk, a sharded dataset fills in place:

    0003/rollouts/part-00001-of-00004.arrow      a shard's rows, renamed into place when complete
    0003/rollouts/_shards/00001-of-00004.json    its marker: size, sha256, rows, wall time, written last
    0003/rollouts/manifest.json                  written when the last marker is there

A part without its marker is not done (a killed task), and the directory is not a dataset until
the manifest exists, so readers refuse it, naming the missing shards. The task that completes the
set writes the manifest, under a lock, so two shards finishing together cannot both or neither
do it. Re-running a finished shard's array task does nothing (or writes the manifest, if the task
that should have was killed first).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa

from kd.stages import datasets_io, locks
from kd.stages.errors import KdError
from kd.stages.schemas import DatasetKind


def from_env(shard: int | None, num_shards: int | None) -> tuple[int, int]:
    """(shard, num_shards) from the options, else from a SLURM array task's environment, else (0, 1)."""
    env = os.environ
    if num_shards is None:
        num_shards = int(env["SLURM_ARRAY_TASK_COUNT"]) if "SLURM_ARRAY_TASK_COUNT" in env else 1
    if shard is None:
        # Array ids need not start at 0 (--array=1-4): the shard is the offset from the first one.
        shard = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0)) if "SLURM_ARRAY_TASK_ID" in env else 0
    if num_shards < 1:
        raise KdError(f"--num-shards {num_shards}: must be >= 1")
    if not 0 <= shard < num_shards:
        raise KdError(f"--shard {shard}: must be in 0..{num_shards - 1} for --num-shards {num_shards}")
    return shard, num_shards


def block(count: int, shard: int, num_shards: int) -> slice:
    """The shard's contiguous share of `count` items; shares differ in size by at most one."""
    return slice(count * shard // num_shards, count * (shard + 1) // num_shards)


def write(out: Path, kind: DatasetKind, shard: int, num_shards: int, stage_config: dict, inputs: list[Path],
          produce: Callable[[Callable[[int], slice]], pa.Table], stats_of: Callable[[pa.Table, float], dict]) -> dict | None:
    """Run a stage's work for one shard and write it; the manifest if this call completed the dataset.

    `produce(select)` computes the rows, taking `select(count)`: the slice of the `count` candidate
    items (prompts, rollout rows) that this shard owns. `stats_of(table, wall_seconds)`: the
    manifest's stats, computed over the whole dataset.
    """
    with locks.named(out.parent.parent, locks.shard_lock_name(out, shard, num_shards), blocking=False):
        if num_shards == 1:
            datasets_io.fault_point(out, "start")
            started = time.time()
            table = produce(lambda count: slice(0, count))
            stats = stats_of(table, time.time() - started)
            return datasets_io.write_dataset(out, kind, table, stage_config, inputs, stats, started)
        if shard not in datasets_io.read_markers(out, num_shards):  # else: a re-run of a finished array task
            datasets_io.fault_point(out, "start")
            started = time.time()
            table = produce(lambda count: block(count, shard, num_shards))
            write_part(out, kind, table, shard, num_shards, time.time() - started)
        return complete(out, kind, num_shards, stage_config, inputs, stats_of)


def write_part(out: Path, kind: DatasetKind, table: pa.Table, shard: int, num_shards: int, wall_seconds: float) -> None:
    """The shard's part, renamed into place complete, then its marker (also renamed into place)."""
    (out / datasets_io.MARKERS).mkdir(parents=True, exist_ok=True)
    remove_dead_writers_files(out)
    name = datasets_io.part_name(shard, num_shards)
    tmp = out / f".{name}.tmp-{os.getpid()}"
    try:
        datasets_io.write_table(tmp, table, kind)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        datasets_io.fault_point(out, f"shard-{shard}:files")
        os.rename(tmp, out / name)
    finally:
        tmp.unlink(missing_ok=True)
    datasets_io.write_marker(out, shard, num_shards, table.num_rows, wall_seconds)


def remove_dead_writers_files(out: Path) -> None:
    for stale in [*out.glob(".*.tmp-*"), *(out / datasets_io.MARKERS).glob(".*.tmp-*")]:
        if not datasets_io.pid_alive(int(stale.name.rsplit("-", 1)[1])):
            stale.unlink(missing_ok=True)


def complete(out: Path, kind: DatasetKind, num_shards: int, stage_config: dict, inputs: list[Path],
             stats_of: Callable[[pa.Table, float], dict]) -> dict | None:
    """Write the manifest if all num_shards shards are done and nobody has; the manifest if this call wrote it.

    Files of another shard layout (an abandoned attempt with another N) are removed first: the
    manifest lists every file in the directory, and they are not part of this dataset."""
    run_dir = out.parent.parent
    with locks.named(run_dir, locks.completion_lock_name(out)):
        if datasets_io.is_complete(out):
            return None
        done = datasets_io.read_markers(out, num_shards)
        if len(done) < num_shards:
            return None
        keep = {datasets_io.part_name(s, num_shards) for s in done} | {f"{datasets_io.MARKERS}/{datasets_io.marker_name(s, num_shards)}" for s in done}
        for path in [*out.glob("*.arrow"), *(out / datasets_io.MARKERS).glob("*")]:
            if str(path.relative_to(out)) not in keep:
                path.unlink()
        remove_dead_writers_files(out)
        wall_seconds = sum(marker["wall_seconds"] for marker in done.values())
        stats = stats_of(datasets_io.read_parts(out, kind, [datasets_io.part_name(s, num_shards) for s in range(num_shards)]),
                         wall_seconds)
        stats.update(shards=num_shards, shard_wall_seconds=[done[s]["wall_seconds"] for s in range(num_shards)])
        rows = sum(marker["rows"] for marker in done.values())
        return datasets_io.write_manifest(
            out, kind, rows, stage_config, datasets_io.stable_hash(stage_config), inputs, stats, wall_seconds, out
        )
