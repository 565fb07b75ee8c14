"""loop: the on-policy driver. For each epoch: generate, score, train, export-lora; eval every k.

    kd loop                      # the toy world on CPU (configs/toy.yaml)
    kd loop --config configs/qwen3-4b-from-32b.yaml --set epochs=50

Stages run in this one process and share a Session, so the teacher, the student's base weights and
the student being trained load once; each stage still reads and writes its datasets on disk exactly
as its standalone command does. Re-running the same command resumes: complete stages are skipped,
an incomplete one is redone from scratch. Eval runs at epochs 0, k, 2k, ... and at the end (policy after training);
then `kd report` writes the run's plots and summary into runs/<id>/report/.

GPU memory: before each stage, the held engines it does not use (pipeline.Stage.engines) sleep, and
a stage wakes the ones it asks for (kd.stages.session; EngineConfig.sleep), so an in-process vLLM
engine at 0.9 of a GPU does not leave train a tenth of it. Each stage's record in metrics.jsonl
carries the GPU memory it used (kd.stages.rundir.log_metrics), shown at the end beside its time.
"""

from __future__ import annotations

import logging
import time

from rich.table import Table

from kd.stages import datasets_io, locks, pipeline, report, rundir
from kd.stages.config import Config
from kd.stages.progress import console
from kd.stages.session import Session

log = logging.getLogger(__name__)


def run(config: Config, overwrite: bool = False) -> list[dict]:
    """Every stage of pipeline.STAGES at the epochs it runs, in order; the held-out table at the end."""
    rundir.prepare(config, overwrite)
    started = time.time()
    with locks.whole_run(config.run_dir), Session(config, progress=False) as session:
        # A bad train prompt file fails now, not after the first evaluation has written a dataset.
        session.prompts(config.generate.prompts, config.generate.max_new_tokens)
        for epoch in range(config.epochs + 1):
            wrote, epoch_started = {}, time.time()
            for stage in pipeline.STAGES:
                if pipeline.runs_at(stage, epoch, config):
                    log.info("epoch %d: %s", epoch, stage.command)
                    session.sleep_engines(keep=stage.engines)
                    wrote[stage.output] = stage.load().run(config, epoch, session)
                if stage is pipeline.EVAL and "eval" in wrote:
                    print_eval(epoch, wrote["eval"])
                    epoch_started = time.time()  # the epoch line times the training stages
            if "train" in wrote:
                print_epoch(config, epoch, wrote["scored"], wrote["train"], time.time() - epoch_started)
    rows = summary(config)
    console.print(summary_table(rows, time.time() - started))
    console.print(stage_times(config))
    console.print(f"report: {report.run(config.run_dir) / 'report.md'}")
    return rows


def print_epoch(config: Config, epoch: int, scored, trained, seconds: float) -> None:
    kl = datasets_io.read_manifest(scored)["stats"]["teacher_kl"]
    train_stats = datasets_io.read_manifest(trained)["stats"]
    console.print(
        f"epoch {epoch + 1:4d}/{config.epochs}  teacher_kl {kl:7.4f}  ratio_max {train_stats['ratio_max']:6.3f}  "
        f"grad_norm {train_stats['grad_norm']:6.3f}  lr {train_stats['learning_rate']:.2e}  {seconds:5.1f}s"
    )


def print_eval(epoch: int, out) -> None:
    stats = datasets_io.read_manifest(out)["stats"]
    accuracy = "n/a" if stats["accuracy"] is None else f"{stats['accuracy']:.1%}"
    console.print(f"[bold]eval after {epoch} epochs: held-out reverse KL {stats['heldout_reverse_kl']:.4f}, accuracy {accuracy}")


def summary(config: Config) -> list[dict]:
    rows = []
    for epoch in pipeline.eval_epochs(config):
        manifest = datasets_io.read_manifest(pipeline.stage_dir(config, epoch, "eval"))
        if manifest is not None:
            rows.append({"epoch": epoch, **manifest["stats"]})
    return rows


def stage_times(config: Config) -> str:
    """Mean wall seconds and the peak resident memory per stage call over the whole run (from
    metrics.jsonl); with a GPU also the most GPU memory in use at a call's end, all processes counted."""
    seconds: dict[str, list[float]] = {}
    peaks: dict[str, dict[str, float]] = {"peak_rss_gib": {}, "gpu_used_gib": {}}
    for record in rundir.read_metrics(config.run_dir):
        if "wall_seconds" in record:
            seconds.setdefault(record["stage"], []).append(record["wall_seconds"])
        for name, peak in peaks.items():
            if record.get(name) is not None:
                peak[record["stage"]] = max(peak.get(record["stage"], 0.0), record[name])

    def memory(stage: str) -> str:
        shown = [text.format(peaks[name][stage]) for name, text in (("peak_rss_gib", "peak {:.1f} GiB"),
                                                                    ("gpu_used_gib", "GPU {:.1f} GiB in use"))
                 if stage in peaks[name]]
        return f" ({', '.join(shown)})" if shown else ""

    parts = [f"{stage} {sum(v) / len(v):.2f}s x{len(v)}{memory(stage)}" for stage, v in seconds.items()]
    return "mean wall time per stage call (peak resident memory): " + ", ".join(parts)


def summary_table(rows: list[dict], seconds: float) -> Table:
    table = Table(title=f"held-out evaluation ({seconds:.0f}s)")
    for column in ("epochs trained", "reverse KL / token", "reverse KL / sequence", "accuracy"):
        table.add_column(column, justify="right")
    for row in rows:
        accuracy = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.1%}"
        table.add_row(str(row["epoch"]), f"{row['heldout_reverse_kl']:.4f}", f"{row['heldout_reverse_kl_per_sequence']:.3f}", accuracy)
    return table
