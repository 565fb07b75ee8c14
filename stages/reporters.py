"""Where metrics go besides metrics.jsonl: TensorBoard and Weights & Biases (config.report_to).

kd.stages.rundir.log_metrics appends each record to runs/<id>/metrics.jsonl (kd's own format: one
object with its `stage`, read by `kd report`) and hands it here. The names are those a TRL or verl
user reads:

    train/<field>        each optimiser step's row (train/loss, train/grad_norm, train/learning_rate,
                         train/teacher_kl, train/entropy, ...) over the global optimiser step
                         (TensorBoard's step; W&B's train/global_step)
    eval/<field>         held-out evaluation (eval/heldout_reverse_kl, eval/accuracy) over the epoch
    <stage>/<field>      the record each other stage writes per call (generate/tokens_per_second,
                         score/teacher_kl, export-lora/wall_seconds, ...) over the epoch (W&B: epoch)
    train_epoch/<field>  train's own per-epoch summary, apart from the per-step series of train/

A train stage killed and re-run logs the steps it redoes again: W&B and TensorBoard then hold two
points at such a step (the same values: a resumed run trains the same weights); metrics.jsonl's
readers take the last row of each step (kd.stages.rundir.read_metrics).

W&B: one run per kd run, its id kept in runs/<id>/wandb-id so that every later process (a resumed
loop, a stage command) logs to the same run (`resume="allow"`); the resolved config is its run
config; WANDB_MODE=offline writes it under runs/<id>/wandb/ for `wandb sync`. Only one process logs
to it at a time: `kd loop`'s overlapped sampling side hands its records to the loop (`held`), and
only the main process of a multi-process train logs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

from kd.stages import pipeline
from kd.stages.config import Config
from kd.stages.errors import KdError

# The `stage` of a record of one optimiser step, and of one teacher self-check (kd.stages.rundir.WITHIN_STAGES).
TRAIN_STEP = f"{pipeline.TRAIN.command}_step"
SELF_CHECK = f"{pipeline.SCORE.command}_self_check"

AXES = ("time", "epoch", "step", "global_step")  # where a record sits, not series of their own
SECTIONS = {TRAIN_STEP: "train", pipeline.TRAIN.command: "train_epoch"}  # other stages: their own name
WANDB_ID = "wandb-id"


def section(stage: str) -> str:
    return SECTIONS.get(stage, stage)


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers by their reported names (section/field); None, text and flags are left out."""
    prefix = section(record["stage"])
    return {f"{prefix}/{name}": value for name, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in AXES}


def report(config: Config, record: dict) -> None:
    """Send one metrics.jsonl record to each of config.report_to."""
    if "tensorboard" in config.report_to:
        to_tensorboard(config, record)
    if "wandb" in config.report_to:
        if _held is not None:
            _held.append(record)
        else:
            to_wandb(config, record)


_tensorboard: dict[Path, Any] = {}


def to_tensorboard(config: Config, record: dict) -> None:
    """runs/<id>/tb/: x is the global optimiser step for a train step's row, else the epoch."""
    from torch.utils.tensorboard import SummaryWriter

    tb_dir = config.run_dir / "tb"
    writer = _tensorboard.get(tb_dir) or _tensorboard.setdefault(tb_dir, SummaryWriter(str(tb_dir)))
    step = record["global_step"] if record["stage"] == TRAIN_STEP else record["epoch"]
    for name, value in scalars(record).items():
        writer.add_scalar(name, value, step)
    writer.flush()  # live: a reader of tb/ sees the step now, not when the writer closes


def require_wandb(config: Config) -> None:
    """One line, before any work, when report_to asks for W&B and the package is not installed."""
    if "wandb" in config.report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise KdError("config field report_to: wandb needs the wandb package; pip install 'kd[wandb]', "
                          "or drop wandb from report_to") from None


_wandb: dict[Path, Any] = {}


def wandb_run(config: Config):
    """This process's W&B run of the kd run: started (or resumed) at the first record it logs."""
    run = _wandb.get(config.run_dir)
    if run is not None:
        return run
    import wandb

    saved = config.run_dir / WANDB_ID
    if not saved.is_file():
        tmp = saved.with_name(f".{WANDB_ID}.tmp-{os.getpid()}")
        tmp.write_text(secrets.token_hex(4) + "\n")  # W&B run ids: lowercase letters and digits
        tmp.replace(saved)
    cfg = config.wandb
    run = wandb.init(project=cfg.project, entity=cfg.entity or None, name=cfg.name or config.run_id,
                     tags=cfg.tags or None, id=saved.read_text().strip(), resume="allow", dir=str(config.run_dir))
    # Retuned fields (kd.stages.config.retunable) may change between the processes of one run.
    run.config.update(config.to_dict(), allow_val_change=True)
    run.define_metric("train/global_step")
    run.define_metric("train/*", step_metric="train/global_step")
    run.define_metric("epoch")
    for stage in (*(s.command for s in pipeline.STAGES), SELF_CHECK):
        run.define_metric(f"{section(stage)}/*", step_metric="epoch")
    _wandb[config.run_dir] = run
    return run


def to_wandb(config: Config, record: dict) -> None:
    if record["stage"] == TRAIN_STEP:
        axes = {"train/global_step": record["global_step"], "train/epoch": record["epoch"]}
    else:
        axes = {"epoch": record["epoch"]}
    wandb_run(config).log({**axes, **scalars(record)})


_held: list[dict] | None = None


@contextlib.contextmanager
def held() -> Iterator[list[dict]]:
    """Within: this process's W&B records are kept in the list yielded instead of sent, for the
    process that holds the W&B run to send with `to_wandb` (one writer per W&B run)."""
    global _held
    _held = []
    try:
        yield _held
    finally:
        _held = None


def close(config: Config) -> None:
    """Finish this process's W&B run of the kd run and close its TensorBoard writer."""
    run = _wandb.pop(config.run_dir, None)
    if run is not None:
        run.finish()
    writer = _tensorboard.pop(config.run_dir / "tb", None)
    if writer is not None:
        writer.close()
