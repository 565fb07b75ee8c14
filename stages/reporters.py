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

W&B: one run per kd run, its id created once in runs/<id>/wandb-id by the first command
(kd.stages.rundir.prepare) and read by every later one. Online, each process that logs joins that
run in W&B's shared mode (several writers of one run, each labelled `<stage>-e<epoch>-<host>-<pid>`;
no resume, no step of its own: the x axes are train/global_step and epoch): the stage commands of
`kd slurm` log side by side (eval beside generate, every score array task, the sampling side's jobs
when max_staleness >= 1). `kd loop`, which holds the run exclusively (kd.stages.locks), is its primary
writer and marks it finished at its end; other writers never mark it finished, so a run that only
Slurm jobs wrote stays "running" or "crashed" in W&B once they end. Within `kd loop`, the overlapped
sampling side hands its records to the loop (`held`), and only the main process of a multi-process
train logs. W&B does not resume offline runs, and `wandb sync` of several offline directories with one
id replaces rather than appends (wandb/wandb#3841), so offline (WANDB_MODE=offline) each process
writes a W&B run of its own under runs/<id>/wandb/, all grouped under the group named by wandb-id:
`wandb sync runs/<id>/wandb/offline-run-*` uploads them all, and the W&B group view shows them as one.

W&B never stops a stage: a failure to start or log (no WANDB_API_KEY, a wrong wandb.entity, the
network) is one warning line, after which this process sends nothing more to W&B; metrics.jsonl and
TensorBoard keep every record.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any, Iterator

from kd.stages import pipeline
from kd.stages.config import Config
from kd.stages.errors import KdError

log = logging.getLogger(__name__)
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


def wandb_id(run_dir: Path) -> str:
    """The W&B run id of the kd run (runs/<id>/wandb-id), created by the first process to ask: array
    tasks that start a run together all read the one that won. The file is written whole and then
    hard-linked into place, which fails when the name exists: unlike O_CREAT|O_EXCL, no reader ever
    sees it empty, and link is atomic on NFS too."""
    saved = run_dir / WANDB_ID
    if not saved.is_file():
        new = secrets.token_hex(4)  # W&B run ids: lowercase letters and digits
        tmp = run_dir / f".{WANDB_ID}.tmp-{new}"  # not the pid: array tasks on two nodes may share one
        tmp.write_text(new + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, saved)
        tmp.unlink()
    return saved.read_text().strip()


def sole_writer(run_dir: Path) -> bool:
    """Whether this process holds runs/<id>/.lock exclusively (`kd loop`): a shared flock on a new
    open file then fails, even within the holder; a stage command holds it shared, beside others."""
    with open(run_dir / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False  # closing handle drops the shared lock taken just now, and only that one


_wandb: dict[Path, Any] = {}  # run_dir -> this process's W&B run, or None once W&B failed here


def wandb_run(config: Config, record: dict):
    """This process's W&B run of the kd run, started at the first record it logs (`record` names
    its writer); None when W&B could not start, said once in one warning line."""
    if config.run_dir in _wandb:
        return _wandb[config.run_dir]
    import wandb

    cfg, run_id = config.wandb, wandb_id(config.run_dir)
    common = dict(project=cfg.project, entity=cfg.entity or None, name=cfg.name or config.run_id,
                  tags=cfg.tags or None, group=run_id, dir=str(config.run_dir))
    try:
        if wandb.setup().settings.mode in ("offline", "dryrun", "disabled"):
            run = wandb.init(**common)  # offline: a W&B run of this process's own (see above)
        else:
            primary = sole_writer(config.run_dir)
            label = f"{record['stage']}-e{record['epoch']}-{socket.gethostname()}-{os.getpid()}"
            run = wandb.init(**common, id=run_id, settings=wandb.Settings(
                mode="shared", x_label=label, x_primary=primary, x_update_finish_state=primary))
        # Retuned fields (kd.stages.config.retunable) may change between the processes of one run.
        run.config.update(config.to_dict(), allow_val_change=True)
        run.define_metric("train/global_step")
        run.define_metric("train/*", step_metric="train/global_step")
        run.define_metric("epoch")
        for stage in (*(s.command for s in pipeline.STAGES), SELF_CHECK):
            run.define_metric(f"{section(stage)}/*", step_metric="epoch")
    except Exception as err:  # noqa: BLE001 - W&B is a view of metrics.jsonl: it never stops a stage
        wandb_failed(config, "start", err)
        run = None
    _wandb[config.run_dir] = run
    return run


def wandb_failed(config: Config, doing: str, err: Exception) -> None:
    first = (str(err).strip().splitlines() or [""])[0]
    log.warning("W&B off in this process: cannot %s run %s in wandb.project=%s wandb.entity=%s (%s: %s); "
                "check WANDB_API_KEY (or `wandb login`) and those fields, or set WANDB_MODE=offline; "
                "metrics.jsonl and TensorBoard keep every record", doing, wandb_id(config.run_dir),
                config.wandb.project, config.wandb.entity or "(default)", type(err).__name__, first)


def to_wandb(config: Config, record: dict) -> None:
    run = wandb_run(config, record)
    if run is None:
        return
    if record["stage"] == TRAIN_STEP:
        axes = {"train/global_step": record["global_step"], "train/epoch": record["epoch"]}
    else:
        axes = {"epoch": record["epoch"]}
    try:
        run.log({**axes, **scalars(record)})
    except Exception as err:  # noqa: BLE001 - as in wandb_run
        wandb_failed(config, "log to", err)
        _wandb[config.run_dir] = None


_held: list[dict] | None = None


@contextlib.contextmanager
def held() -> Iterator[list[dict]]:
    """Within: this process's W&B records are kept in the list yielded instead of sent, for the
    process that holds the W&B run to send with `to_wandb` (`kd loop`: its own process, the run's primary writer)."""
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
        try:
            run.finish()
        except Exception as err:  # noqa: BLE001 - as in wandb_run
            wandb_failed(config, "finish", err)
    writer = _tensorboard.pop(config.run_dir / "tb", None)
    if writer is not None:
        writer.close()
