"""loop: the on-policy driver. For each epoch: generate, score, train, export-lora; eval every k.

    kd loop                      # the toy world on CPU (configs/toy.yaml)
    kd loop --config configs/qwen3-4b-from-32b.yaml --set epochs=50

Stages run in this one process and share a Session, so the teacher, the student's base weights and
the student being trained load once; each stage still reads and writes its datasets on disk exactly
as its standalone command does. Re-running the same command resumes: complete stages are skipped,
an incomplete one is redone from scratch. Eval runs at epochs 0, k, 2k, ... and at the end (policy after training);
then `kd report` writes the run's plots and summary into runs/<id>/report/.

Overlap (max_staleness s >= 1): generate at epoch e samples with the adapter of epoch e-1-s
(kd.stages.pipeline), so the stages that run engines (eval, generate, score: the sampling side) run
in a worker process of their own while this process trains (train, export-lora: the training
side), each side taking its stages in the order of the sequential loop and starting each one as
soon as the datasets the pipeline table says it reads are complete: the sampling and scoring of
epoch e+s run while epoch e trains (eval, which nothing reads, after its epoch's score). What each stage writes depends on its inputs alone, never on
which side got there first, so the datasets and adapters are those of the stage commands run one by
one with the same threads (tested; another thread count changes float rounding), and a kill
anywhere resumes to them. `overlap` (kd.stages.config.OverlapConfig)
splits the cores or GPUs between the sides.

GPU memory: before each stage, the held engines it does not use (pipeline.Stage.engines) sleep, and
a stage wakes the ones it asks for (kd.stages.session; EngineConfig.sleep), so an in-process vLLM
engine at 0.9 of a GPU does not leave train a tenth of it. Each stage's record in metrics.jsonl
carries the GPU memory it used (kd.stages.rundir.log_metrics), shown at the end beside its time.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import time
from pathlib import Path

from rich.table import Table

from kd.stages import datasets_io, locks, pipeline, report, reporters, retention, rundir
from kd.stages.config import Config
from kd.stages.errors import KdError
from kd.stages.progress import console
from kd.stages.session import Session, quiet_transformers

log = logging.getLogger(__name__)


def run(config: Config, overwrite: bool = False) -> list[dict]:
    """Every stage of pipeline.STAGES at the epochs it runs, in order; the held-out table at the end.

    On a terminal, bars show the work inside each stage (samples drawn, sequences scored, optimiser
    steps; kd.stages.progress) and vanish when it ends; elsewhere (a log file, a pipe) it prints only
    one line per epoch and per evaluation."""
    rundir.prepare(config, overwrite)
    started = time.time()
    quiet_transformers()  # per-load bars of transformers would drown the epoch lines
    try:
        with locks.whole_run(config.run_dir), Session(config, progress=True) as session:
            # A bad train prompt file fails now, not after the first evaluation has written a dataset.
            session.prompts(config.generate.prompts, config.generate.max_new_tokens)
            if config.max_staleness:
                overlapped(config, session)
            else:
                sequential(config, session)
        rows = summary(config)
        console.print(summary_table(rows, time.time() - started))
        console.print(stage_times(config))
        console.print(f"report: {report.run(config.run_dir) / 'report.md'}")
    finally:
        reporters.close(config)
    return rows


def sequential(config: Config, session: Session) -> None:
    for epoch in range(config.epochs + 1):
        wrote, epoch_started = {}, time.time()
        for stage in pipeline.STAGES:
            if pipeline.runs_at(stage, epoch, config):
                log.info("epoch %d: %s", epoch, stage.command)
                session.sleep_engines(keep=stage.engines)
                wrote[stage.output] = stage.load().run(config, epoch, session)
                retention.prune(config)
            if stage is pipeline.EVAL and "eval" in wrote:
                print_eval(epoch, wrote["eval"])
                epoch_started = time.time()  # the epoch line times the training stages
        if "train" in wrote:
            print_epoch(config, epoch, wrote["scored"], wrote["train"], time.time() - epoch_started)


def overlapped(config: Config, session: Session) -> None:
    """The sampling side (the stages with engines) in a worker process, the training side here. The
    worker gets its whole list at once and each side starts its next stage as soon as the datasets
    it reads (pipeline.inputs_at) are complete, so generate and score of epoch e+s both run while
    epoch e trains. Nothing reads eval: on the sampling side it comes after its epoch's score."""
    sides: dict[bool, list[tuple[int, pipeline.Stage]]] = {True: [], False: []}
    for epoch in range(config.epochs + 1):
        for stage in sorted(pipeline.STAGES, key=lambda stage: stage is pipeline.EVAL):
            if pipeline.runs_at(stage, epoch, config):
                sides[bool(stage.engines)].append((epoch, stage))
    sampling, training = sides[True], sides[False]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    devices = visible_devices(config.overlap.sampler_devices)
    sampler_threads = config.overlap.sampler_threads or max(1, cores // 2)
    trainer_threads = config.overlap.trainer_threads or max(1, cores - cores // 2)
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(trainer_threads)
    console.print(f"overlapped loop (max_staleness {config.max_staleness}): sampling side {sampler_threads} threads"
                  + (f", GPUs {devices} (CUDA_VISIBLE_DEVICES)" if devices else "")
                  + f"; training side {trainer_threads} threads")
    side = SamplingSide(config, sampler_threads, devices, sampling)
    epoch_started = time.time()
    try:
        while training or side.pending:
            while side.done():
                epoch, stage, wrote = side.result()
                if stage is pipeline.EVAL:
                    print_eval(epoch, wrote)
            if training and ready(config, *training[0]):
                epoch, stage = training.pop(0)
                log.info("epoch %d: %s (training side)", epoch, stage.command)
                stage.load().run(config, epoch, session)
                retention.prune(config)
                if stage is pipeline.EXPORT_LORA:
                    print_epoch(config, epoch, pipeline.stage_dir(config, epoch, "scored"),
                                pipeline.stage_dir(config, epoch, "train"), time.time() - epoch_started)
                    epoch_started = time.time()
            elif side.pending:
                side.wait()  # what the training side waits for is the sampling side's
            elif training:  # nothing runs and nothing can start: the table is inconsistent
                raise RuntimeError(f"overlapped loop stalled before {training[0]}")
    finally:
        side.close()
        torch.set_num_threads(threads_before)


def visible_devices(indices: str, visible: str | None = None) -> str:
    """CUDA_VISIBLE_DEVICES for the sampling side: overlap.sampler_devices `indices` ("1,2") count
    among the GPUs this process sees (`visible`: the CUDA_VISIBLE_DEVICES it has, as Slurm sets it to
    the job's GPUs; None: read it from the environment, where unset means every GPU), so "1" is the
    job's second GPU whichever physical one that is. Refused with one line when an index is past them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if not indices or visible is None:
        return indices
    seen = visible.split(",") if visible else []  # set but empty: no GPU is visible
    past = [index for index in indices.split(",") if int(index) >= len(seen)]
    if past:
        raise KdError(f"config field overlap.sampler_devices: GPU {past[0]} is not among the {len(seen)} this process "
                      f"sees (CUDA_VISIBLE_DEVICES={visible}); count from 0 among those")
    return ",".join(seen[int(index)] for index in indices.split(","))


def ready(config: Config, epoch: int, stage: pipeline.Stage) -> bool:
    """Whether every dataset `stage` reads at `epoch` is complete."""
    return all(datasets_io.is_complete(pipeline.stage_dir(config, e, name))
               for e, name in pipeline.inputs_at(stage, epoch, config.max_staleness))


class SamplingSide:
    """The worker process of the sampling side: its own Session (engines loaded once, kept across
    epochs) runs `tasks` in order, each once its inputs are complete, and reports each over a pipe.
    It dies with the loop (Linux: PR_SET_PDEATHSIG)."""

    def __init__(self, config: Config, threads: int, devices: str, tasks: list[tuple[int, pipeline.Stage]]):
        context = multiprocessing.get_context("spawn")  # CUDA and vLLM do not survive fork
        self.connection, child = context.Pipe()
        self.config = config
        self.tasks = list(tasks)
        self.pending = len(tasks)
        commands = [(epoch, stage.command) for epoch, stage in tasks]
        self.process = context.Process(target=sampling_worker, args=(child, config, threads, devices, commands),
                                       name="kd-sampling")
        self.process.start()
        child.close()

    def done(self) -> bool:
        """A report is waiting, or the worker is gone (a forked engine process may keep the pipe open)."""
        return self.pending > 0 and (self.connection.poll() or not self.process.is_alive())

    def wait(self) -> None:
        multiprocessing.connection.wait([self.connection, self.process.sentinel])

    def result(self) -> tuple[int, pipeline.Stage, Path]:
        epoch, stage = self.tasks[len(self.tasks) - self.pending]
        try:
            if not self.connection.poll():
                raise EOFError
            ok, value = self.connection.recv()
        except (EOFError, ConnectionError):
            self.process.join()
            raise KdError(f"the sampling side died during {stage.command} of epoch {epoch} (exit code "
                          f"{self.process.exitcode}: killed, or out of memory); re-run the same command to resume") from None
        if not ok:
            raise value
        self.pending -= 1
        wrote, records = value
        for record in records:  # the worker's W&B records: this process holds the W&B run
            reporters.to_wandb(self.config, record)
        return epoch, stage, wrote

    def close(self) -> None:
        """Stop the worker: it exits by itself once its list is done; on a failure it is killed in
        the middle of a stage, whose output is staged, never published (the next writer removes it)."""
        self.process.join(60 if not self.pending else 0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def sampling_worker(connection, config: Config, threads: int, devices: str, tasks: list[tuple[int, str]]) -> None:
    import ctypes
    import signal
    import traceback

    with contextlib.suppress(OSError, AttributeError):  # not Linux: the loop's close() still stops it
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    import torch

    torch.set_num_threads(threads)
    try:
        with Session(config, progress=False) as session:
            for epoch, command in tasks:
                stage = pipeline.by_command(command)
                while not ready(config, epoch, stage):
                    time.sleep(0.02)  # the adapter it samples with is the training side's to write
                log.info("epoch %d: %s (sampling side)", epoch, command)
                session.sleep_engines(keep=stage.engines)
                with reporters.held() as records:
                    wrote = stage.load().run(config, epoch, session)
                connection.send((True, (wrote, records)))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the loop reports it, not a second traceback
        raise SystemExit(130) from None
    except (KdError, OSError) as err:
        connection.send((False, err))
    except Exception:  # noqa: BLE001 - sent whole: an arbitrary exception may not pickle
        connection.send((False, RuntimeError(f"the sampling side failed:\n{traceback.format_exc()}")))


def print_epoch(config: Config, epoch: int, scored, trained, seconds: float) -> None:
    manifests = datasets_io.read_manifest(scored), datasets_io.read_manifest(trained)
    if None in manifests:  # a resumed run's epoch that retention has pruned since
        return
    kl = manifests[0]["stats"]["teacher_kl"]
    train_stats = manifests[1]["stats"]
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
    table = Table(title=f"held-out evaluation (loop {seconds:.0f}s)")
    for column in ("epochs trained", "reverse KL / token", "reverse KL / sequence", "accuracy"):
        table.add_column(column, justify="right")
    for row in rows:
        accuracy = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.1%}"
        table.add_row(str(row["epoch"]), f"{row['heldout_reverse_kl']:.4f}", f"{row['heldout_reverse_kl_per_sequence']:.3f}", accuracy)
    return table
