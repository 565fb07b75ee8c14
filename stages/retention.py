"""Retention: a long run keeps the datasets of its newest epochs only (keep_epochs, keep_adapters_every).

Each epoch writes rollouts, scored, train (the adapter and its float32 optimiser state) and adapter:
for a 4B student at LoRA rank 16 about half a GB, so a run of thousands of epochs would fill its disk.
With keep_epochs N > 0, `prune` removes a dataset of epoch e once
- e is older than the newest N trained epochs (those with a complete adapter; anything newer, such as
  the sampling side's epochs of an overlapped loop, is in progress and kept), and
- every stage that reads it (pipeline.readers_of: score reads rollouts, train reads scored and the
  previous train, export-lora train, generate and eval the adapter) has finished,
and keeps the adapter of every K-th epoch (keep_adapters_every) and every eval dataset for good.

The removal is recorded first, in <epoch>/pruned.json (each dataset's kind, rows, bytes and its
manifest's sha256), then the directory is renamed out of the way and deleted: a kill in between
leaves the record, and the next prune finishes the job. A pruned dataset counts as complete
(datasets_io.is_complete), so resuming, growing the run, `kd slurm` and `kd status` skip it, and the
datasets made from it still check their recorded input hash against the record (`kd verify`).
`kd loop` prunes after each stage (the overlapped loop after each of its training side's); each
stage command (hence each Slurm job) after it finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from kd.stages import datasets_io, locks, pipeline
from kd.stages.config import Config
from kd.stages.progress import console


def prune(config: Config) -> list[Path]:
    """Remove what the run no longer needs (see the module docstring); the directories removed."""
    for leftover in config.run_dir.glob("[0-9]" * 4 + "/.*.pruning"):  # a kill during a removal
        shutil.rmtree(leftover, ignore_errors=True)
    if not config.keep_epochs:
        return []
    epochs = sorted((int(p.name) for p in config.run_dir.glob("[0-9]" * 4) if p.is_dir()), reverse=True)
    newest = next((e for e in epochs if datasets_io.is_complete(pipeline.stage_dir(config, e, pipeline.EXPORT_LORA.output))), None)
    if newest is None:
        return []
    removed, freed = [], 0
    with locks.named(config.run_dir, "retention"):  # stage commands of one run (Slurm jobs) prune side by side
        for epoch in (e for e in epochs if e <= newest - config.keep_epochs):
            candidates = [stage for stage in pipeline.EPOCH if not kept_for_good(config, epoch, stage)
                          and pipeline.stage_dir(config, epoch, stage.output).is_dir()]
            # Every old epoch is looked at again (a few stat calls each): under `kd slurm` an eval
            # may finish after later epochs, so an older adapter can become prunable last.
            outputs = [stage.output for stage in candidates if prunable(config, epoch, stage)]
            if outputs:
                paths, size = remove(config, epoch, outputs)
                removed, freed = removed + paths, freed + size
    if removed:
        epochs_removed = sorted({path.parent.name for path in removed})
        console.print(f"retention (keep_epochs {config.keep_epochs}): removed {len(removed)} datasets of {config.run_dir}, "
                      f"epochs {epochs_removed[0]}..{epochs_removed[-1]}, {freed / 2**20:.1f} MiB (recorded in each "
                      f"epoch's {datasets_io.PRUNED})")
    return removed


def kept_for_good(config: Config, epoch: int, stage: pipeline.Stage) -> bool:
    every = config.keep_adapters_every
    return stage is pipeline.EXPORT_LORA and bool(every) and (epoch + 1) % every == 0


def prunable(config: Config, epoch: int, stage: pipeline.Stage) -> bool:
    """Complete, and every stage that reads it (pipeline.readers_of) has finished. Train of epoch e
    also reads, with max_staleness s >= 1, the sampler's adapter e-1-s (its importance weights),
    which the table does not list as train's input: keep_epochs >= 1 + s keeps it (config check)."""
    out = pipeline.stage_dir(config, epoch, stage.output)
    if not datasets_io.is_complete(out):  # being written
        return False
    return all(datasets_io.is_complete(pipeline.stage_dir(config, e, reader.output))
               for e, reader in pipeline.readers_of(config, epoch, stage.output))


def remove(config: Config, epoch: int, outputs: list[str]) -> tuple[list[Path], int]:
    """Record, then delete, datasets `outputs` of `epoch`: the directories removed and their bytes."""
    record_path = config.run_dir / f"{epoch:04d}" / datasets_io.PRUNED
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for output in outputs:
        out = pipeline.stage_dir(config, epoch, output)
        manifest = datasets_io.read_manifest(out)
        if output not in record and manifest is not None:
            record[output] = {"kind": manifest["kind"], "rows": manifest["rows"],
                              "manifest_sha256": datasets_io.manifest_hash(out),
                              "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
                              "pruned_at": round(time.time(), 3)}
    tmp = record_path.with_name(f".{datasets_io.PRUNED}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(record_path)
    removed = []
    for output in outputs:
        out = pipeline.stage_dir(config, epoch, output)
        datasets_io.fault_point(out, "pruned")
        doomed = out.with_name(f".{output}.pruning")
        out.rename(doomed)  # atomic: no reader ever sees a half-deleted dataset under its name
        shutil.rmtree(doomed, ignore_errors=True)  # what is left, the next prune removes
        removed.append(out)
    return removed, sum(record[output]["bytes"] for output in outputs)
