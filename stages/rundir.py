"""A run on disk: runs/<run-id>/{config.yaml, metrics.jsonl, tb/, <epoch:04d>/<stage>/}.

The run's resolved config is written by its first command; a later command with a config that
changes results is refused (unless the user asks to overwrite), because mixing two configs in one
run makes every number in it meaningless. Fields marked `retunable` (kd.stages.config) may change:
the saved config then takes their new values. Where each stage's dataset lives is
kd.stages.pipeline's; the locks are kd.stages.locks'.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import yaml

from kd.stages import config as config_lib, datasets_io, pipeline, reporters
from kd.stages.config import Config
from kd.stages.errors import KdError
from kd.stages.schemas import ADAPTER


@contextlib.contextmanager
def new_run_removed_on_failure(config: Config) -> Iterator[None]:
    """A command that fails leaves runs/ as it found it: a run directory it created goes again,
    unless a complete dataset is already in it (finished work is never deleted)."""
    created = not config.run_dir.exists()
    try:
        yield
    except BaseException:
        finished_work = any(config.run_dir.glob("*/*/manifest.json")) or any(config.run_dir.glob("*/*/_shards/*.json"))
        if created and config.run_dir.exists() and not finished_work:
            shutil.rmtree(config.run_dir, ignore_errors=True)
        raise


def policy_adapter(config: Config, epoch: int, stage: pipeline.Stage = pipeline.GENERATE) -> Path | None:
    """The complete adapter `stage` reads at `epoch` (pipeline.policy_adapter_dir; None: the base
    student), or a one-line error."""
    adapter = pipeline.policy_adapter_dir(config, epoch, stage)
    if adapter is not None:
        datasets_io.require(adapter, ADAPTER, f"run `kd export-lora --epoch {int(adapter.parent.name)}` first")
    return adapter


def prepare(config: Config, overwrite: bool = False) -> Path:
    """Create the run directory with its config.yaml, or check that an existing one matches."""
    reporters.require_wandb(config)
    run_dir = config.run_dir
    saved = run_dir / "config.yaml"
    if saved.is_file():
        existing = config_lib.build(Config, yaml.safe_load(saved.read_text()), where="")
        same = existing.fingerprint() == config.fingerprint()
        if not same or schedule_moved(existing, config):
            if overwrite:
                shutil.rmtree(run_dir)
            elif not same:
                changed = differing_fields(config_lib.results_part(existing), config_lib.results_part(config))
                raise KdError(
                    f"{run_dir}: this run was made with another config (differs in {', '.join(changed[:5])}); "
                    "use another run_id, or `kd loop --overwrite` to delete the run and start again"
                )
            else:
                raise KdError(
                    f"{run_dir}: epochs {existing.epochs} -> {config.epochs}, but train.lr_scheduler "
                    f"{config.train.lr_scheduler} decays over the whole run's optimiser steps, so the steps already "
                    f"taken followed another schedule; keep epochs {existing.epochs}, use another run_id, or "
                    "`kd loop --overwrite` to start again (a constant schedule can grow)"
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    text = config_lib.to_yaml(config)
    if not saved.is_file() or saved.read_text() != text:  # new run, or a retuned one (epochs grew, ...)
        tmp = run_dir / f".config.yaml.tmp-{os.getpid()}"  # array tasks may start a run together
        tmp.write_text(text)
        tmp.replace(saved)
    if "wandb" in config.report_to:
        reporters.wandb_id(run_dir)  # now, before the array tasks of `kd slurm` log side by side
    return run_dir


def schedule_moved(existing: Config, config: Config) -> bool:
    """`epochs` is outside the fingerprint so that a run can grow, but a linear or cosine learning rate
    depends on it at every step (kd.stages.schedule): once a train stage has stepped, such a run
    refuses another `epochs` rather than mix two schedules."""
    return (existing.epochs != config.epochs and config.train.lr_scheduler != "constant"
            and any(config.run_dir.glob(f"*/{pipeline.TRAIN.output}/{datasets_io.MANIFEST}")))


def differing_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted names of the fields whose values differ between two configs' `results_part`s."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differing_fields(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def peak_rss_gib() -> float | None:
    """This process's peak resident memory (VmHWM) since the last `reset_peak_rss`, in GiB; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 2**20 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def reset_peak_rss() -> None:
    """Start a new peak-memory window: writing 5 to /proc/self/clear_refs resets VmHWM (Linux >= 4.0)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _cuda():
    """torch when this process has CUDA, else None; torch is never imported here: a process that has
    not imported it has used no GPU (the data layer stays torch-free)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() else None


def peak_gpu_gib() -> float | None:
    """This process's peak GPU memory held by tensors (torch.cuda.max_memory_allocated, summed over its
    GPUs) since the last `reset_peak_gpu`, in GiB: 0 if it has not used its GPU; None without CUDA."""
    torch = _cuda()
    if torch is None:
        return None
    if not torch.cuda.is_initialized():
        return 0.0
    return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30


def reset_peak_gpu() -> None:
    torch = _cuda()
    if torch is not None and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def gpu_used_gib() -> float | None:
    """GPU memory in use now on the GPUs this process sees, by every process (as nvidia-smi counts it:
    a vLLM engine's own process included), in GiB; None without CUDA or without nvidia-ml-py."""
    torch = _cuda()
    if torch is None:
        return None
    try:
        return sum(torch.cuda.device_memory_used(i) for i in range(torch.cuda.device_count())) / 2**30
    except Exception:  # noqa: BLE001 - no NVML (nvidia-ml-py) or an older torch: a metric, never a failure
        return None


# Records a stage writes about its own parts (each optimiser step; each teacher self-check), not stages.
WITHIN_STAGES = (reporters.TRAIN_STEP, reporters.SELF_CHECK)


def log_metrics(config: Config, record: dict) -> None:
    """Append one line to metrics.jsonl, and send its numbers to config.report_to (TensorBoard,
    W&B: kd.stages.reporters, which names them), at once: a train step's row while train runs.

    A stage's record carries `peak_rss_gib`, the process's peak resident memory since the previous
    stage's record (or the process start): in `kd loop`, the stage's own peak, models kept loaded
    included; for a sharded stage, that of the array task that completed the dataset. Likewise
    `peak_gpu_gib`, the peak GPU memory of this process's tensors (the trainer's, an hf engine's), and
    `gpu_used_gib`, the GPU memory in use by every process when the stage ended: an in-process vLLM
    engine runs in a process of its own, so this one says whether it was awake (see kd.stages.session;
    both None without CUDA).
    """
    record = {"time": round(time.time(), 3), **record}
    if record["stage"] not in WITHIN_STAGES:
        record["peak_rss_gib"] = peak_rss_gib()
        reset_peak_rss()
        record["peak_gpu_gib"] = peak_gpu_gib()
        reset_peak_gpu()
        record["gpu_used_gib"] = gpu_used_gib()
    with open(config.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
    reporters.report(config, record)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl in the order written, a train step's row once: train logs each
    step as it is taken, so a train stage killed and re-run (from the epoch's start, its checkpoint)
    logged the steps it redid twice; the last row of each global_step is kept, where the first was."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = {r["global_step"]: r for r in records if r["stage"] == reporters.TRAIN_STEP}
    return [last.pop(r["global_step"]) if r["stage"] == reporters.TRAIN_STEP else r
            for r in records if r["stage"] != reporters.TRAIN_STEP or r["global_step"] in last]
