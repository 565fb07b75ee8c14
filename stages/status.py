"""status: per epoch and stage, what is done, being written, queued in Slurm, or missing.

    kd status runs/toy

A dataset is done when its manifest exists (a scored one of several teachers shows how many rows
each scored); a sharded one shows how many of its shards are done and how many are being written
(their shard locks are held); a stage being written by a live
process on this host shows "writing"; a stage with a job of `kd slurm` still in the queue shows
its Slurm state (pending, running, ...); one that retention removed once done shows "pruned".
"""

from __future__ import annotations

from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from kd.stages import config as config_lib, datasets_io, locks, pipeline, slurm
from kd.stages.config import Config
from kd.stages.errors import KdError
from kd.stages.pipeline import Stage


def load_run_config(run_dir: Path) -> Config:
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise KdError(f"{run_dir}: not a kd run (no config.yaml)")
    data = yaml.safe_load(saved.read_text())
    data["runs_dir"], data["run_id"] = str(Path(run_dir).parent), Path(run_dir).name
    return config_lib.build(Config, data, where="")


def being_written(out: Path) -> bool:
    """A live process on this host stages this directory (staging_dir names carry the writer's pid)."""
    return any(datasets_io.pid_alive(int(p.name.split("-")[-2])) for p in out.parent.glob(f".{out.name}.tmp-*"))


def stage_state(config: Config, epoch: int, stage: Stage, queue: dict[str, str]) -> str:
    out = pipeline.stage_dir(config, epoch, stage.output)
    manifest = datasets_io.read_manifest(out)
    if manifest is not None:
        stats = manifest["stats"] if isinstance(manifest.get("stats"), dict) else {}
        details = [f"{stats['shards']} shards"] if stats.get("shards", 1) > 1 else []
        if len(stats.get("teachers") or {}) > 1:  # the rows each teacher scored
            details.append(", ".join(f"{name} {split['rows']}" for name, split in stats["teachers"].items()))
        return f"done ({'; '.join(details)})" if details else "done"
    if datasets_io.pruned_record(out) is not None:
        return "pruned"  # done, then removed by retention (kd.stages.retention)
    name = slurm.job_name(config, epoch, stage.command)
    # A score of several teachers is one job per teacher, named <name>-<teacher>.
    state = queue.get(name) or next((s for job, s in queue.items() if job.startswith(f"{name}-")), None)
    counts = datasets_io.layouts(out) if out.is_dir() else []
    if counts:
        num_shards = counts[-1]
        done = len(datasets_io.read_markers(out, num_shards))
        writing = sum(locks.is_locked(config.run_dir, locks.shard_lock_name(out, s, num_shards)) for s in range(num_shards))
        text = f"{done}/{num_shards} shards" + (f", {writing} writing" if writing else "")
        return f"{text}, {state}" if state else text
    # Unsharded, a stage of one teacher writes shard 0 of 1; of T teachers, the first writes shard 0 of T.
    layout = len(config.teachers) if stage is pipeline.SCORE else 1
    own_lock = locks.shard_lock_name(out, 0, layout) if stage.shardable else locks.stage_lock_name(epoch, stage.key)
    if being_written(out) or locks.is_locked(config.run_dir, own_lock):
        return "writing"
    return state or "missing"


def run(run_dir: Path) -> list[dict]:
    config = load_run_config(run_dir)
    queue = slurm.queued(config)
    rows = []
    for epoch in range(config.epochs + 1):
        row = {"epoch": epoch}
        for stage in pipeline.STAGES:
            row[stage.command] = stage_state(config, epoch, stage, queue) if pipeline.runs_at(stage, epoch, config) else ""
        rows.append(row)
    columns = ("epoch", *(stage.command for stage in pipeline.STAGES))
    table = Table(title=f"{run_dir}: {config.epochs} epochs")
    for column in columns:
        table.add_column(column, justify="right" if column == "epoch" else "left")
    for row in rows:
        table.add_row(*(str(row[column]) for column in columns))
    Console(width=120).print(table)  # stdout: the table is the command's output, not a log line
    return rows
