"""slurm: the on-policy loop as a chain of Slurm jobs, epoch after epoch.

    kd slurm --run toy                        # submit every epoch of the run's config
    kd slurm --run toy --dry-run              # print the sbatch scripts instead
    kd slurm --run toy --resources configs/slurm/cluster.yaml --wait

Per epoch e: generate (an array job, one task per shard) -> score (an array job; one per teacher
with score.teachers, each filling in its teacher's shards, kd.stages.score) -> train (one job;
with slurm.train.tasks > 1, that many processes under `accelerate launch`, on each of
slurm.train.nodes nodes) -> export-lora, each
`--dependency=afterok` on the job before it; generate of e waits for export-lora of e-1, and eval
runs at the loop's eval epochs once the adapter it evaluates exists. Jobs are submitted with
`--kill-on-invalid-dep=yes`: when one fails, the jobs waiting on it are removed rather than left
pending forever.

Submitting is idempotent: a stage whose dataset is complete is not submitted, and an array is
submitted for its missing shards only, so after a failure or an `scancel`, running `kd slurm`
again finishes the run. Scripts are rendered from configs/slurm/stage.sbatch (slurm.template)
with the run's slurm.* resources, written to runs/<id>/slurm/, their logs to runs/<id>/slurm/logs/.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

from kd.stages import datasets_io, pipeline
from kd.stages.config import Config, SlurmJob
from kd.stages.errors import KdError
from kd.stages.pipeline import Stage


@dataclass
class Job:
    key: str  # "<epoch>-<command>", unique within a run
    name: str  # the Slurm job name: kd-<run id>-<epoch>-<command>
    script: str
    after: list[str] = field(default_factory=list)  # keys of the jobs this one waits for
    array: str = ""  # --array indices (shards), empty for a plain job


def job_name(config: Config, epoch: int, command: str) -> str:
    return f"kd-{config.run_id}-{epoch:04d}-{command}"


def packaged(relative: str) -> Path:
    return Path(str(resources.files("kd.configs") / relative))


def resources_of(config: Config, stage: Stage) -> SlurmJob:
    return getattr(config.slurm, stage.key)


def stage_command(config: Config, stage: Stage, epoch: int, python: str, teacher: str | None = None) -> str:
    """The shell lines a job runs: kd itself, under accelerate for a multi-process train (on_each_node
    for several nodes); `teacher`: score that teacher's rows only."""
    config_file = (config.run_dir / "config.yaml").resolve()
    kd_args = f"-m kd.cli.main {stage.command} --config {shlex.quote(str(config_file))} --epoch {epoch}"
    if teacher is not None:
        kd_args += f" --teacher {teacher}"
    job = resources_of(config, stage)
    if stage.shardable and job.tasks > 1:
        # The array index is the shard, explicitly: a resubmission of missing shards only
        # (--array=1,3) must not renumber them.
        kd_args += f" --shard $SLURM_ARRAY_TASK_ID --num-shards {job.tasks}"
    if stage is pipeline.TRAIN and job.tasks * job.nodes > 1:
        accelerate_config = config.slurm.accelerate_config or str(
            packaged("accelerate/ddp.yaml" if job.gpus else "accelerate/cpu-ddp.yaml")
        )
        # A port per job: two trainings on one node must not share torchrun's rendezvous port.
        # --num_processes counts the processes of every node (accelerate divides it by --num_machines).
        launch = (f"{python} -m accelerate.commands.launch --config_file {shlex.quote(accelerate_config)} "
                  f"--num_processes {job.tasks * job.nodes} --num_cpu_threads_per_process {max(1, job.cpus // job.tasks)} "
                  f"--main_process_port $((20000 + SLURM_JOB_ID % 20000))")
        return f"{launch} {kd_args}" if job.nodes == 1 else on_each_node(job, launch, kd_args)
    return f"{python} {kd_args}"


def on_each_node(job: SlurmJob, launch: str, kd_args: str) -> str:
    """`launch` (accelerate launch) of kd on each of the job's nodes: one srun task per node, machine
    rank = the node's index in the job ($SLURM_NODEID), every rank meeting at the first node of
    $SLURM_JOB_NODELIST (torchrun's static rendezvous: accelerate's --num_machines, --machine_rank,
    --main_process_ip; https://huggingface.co/docs/accelerate/basic_tutorials/launch)."""
    # Machine rank 0 hosts the rendezvous, so it must run on the main host: srun numbers the nodes in
    # the order of the job's node list, whose first node is also the one running this batch script.
    per_node = (f"exec {launch} --num_machines {job.nodes} --machine_rank $SLURM_NODEID "
                f"--main_process_ip $KD_MAIN_HOST {kd_args}")
    # srun does not inherit sbatch's --cpus-per-task (since Slurm 22.05, per its release notes), and a
    # node whose launch fails must end the others, which would otherwise wait for it at the rendezvous
    # until the time limit.
    return ('KD_MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
            "export KD_MAIN_HOST\n"
            f"srun --nodes={job.nodes} --ntasks-per-node=1 --cpus-per-task={job.cpus} --kill-on-bad-exit=1 "
            f"bash -c {shlex.quote(per_node)}")


def render(config: Config, epoch: int, stage: Stage, python: str, workdir: Path, array: str,
           teacher: str | None = None) -> str:
    job = resources_of(config, stage)
    directives = [f"#SBATCH --array={array}"] if array else []
    directives += [f"#SBATCH --nodes={job.nodes}", "#SBATCH --ntasks-per-node=1"] if job.nodes > 1 else []
    directives += [f"#SBATCH --gres=gpu:{job.gpus}"] if job.gpus else []
    directives += [f"#SBATCH --partition={config.slurm.partition}"] if config.slurm.partition else []
    directives += [f"#SBATCH --account={config.slurm.account}"] if config.slurm.account else []
    template_path = Path(config.slurm.template) if config.slurm.template else packaged("slurm/stage.sbatch")
    try:
        template = Template(template_path.read_text())
    except OSError:
        raise KdError(f"{template_path}: sbatch template not found; fix slurm.template or leave it empty") from None
    name = job_name(config, epoch, stage.command if teacher is None else f"{stage.command}-{teacher}")
    values = {
        "description": f"run {config.run_id}, epoch {epoch}: kd {stage.command}" + (f" --teacher {teacher}" if teacher else ""),
        "job_name": name, "log_dir": (config.run_dir / "slurm" / "logs").resolve(),
        "log_name": f"{name}-%A_%a.out" if array else f"{name}-%j.out",
        "cpus": job.cpus, "mem": job.mem, "time": job.time, "directives": "\n".join(directives),
        "workdir": shlex.quote(str(workdir)), "setup": config.slurm.setup.strip(),
        "command": stage_command(config, stage, epoch, python, teacher),
    }
    try:
        return template.substitute(values)
    except (KeyError, ValueError) as err:
        raise KdError(
            f"{template_path}: bad placeholder ({err}); the template may use ${{{'}, ${'.join(values)}}} and $$ for a $"
        ) from None


def missing_shards(out: Path, tasks: int, first: int = 0, layout: int | None = None) -> list[int]:
    """Which of the `tasks` shards first, first + 1, ... of a `layout`-shard dataset (default: tasks)
    are not done, numbered from 0 (array task ids)."""
    done = datasets_io.read_markers(out, layout or tasks)
    return [s for s in range(tasks) if first + s not in done]


def plan(config: Config, python: str = sys.executable, workdir: Path | None = None) -> list[Job]:
    """The jobs that are still needed, in submission order, each after the jobs that write its inputs
    (pipeline.Stage.inputs); a stage whose dataset is complete is not submitted, nor waited for."""
    workdir = (workdir or Path.cwd()).resolve()
    jobs: list[Job] = []
    writers: dict[tuple[int, str], list[str]] = {}  # (epoch, dataset) -> keys of the jobs submitted to write it
    teachers = list(config.teachers)

    for epoch in range(config.epochs + 1):
        for stage in pipeline.STAGES:
            out = pipeline.stage_dir(config, epoch, stage.output)
            if not pipeline.runs_at(stage, epoch, config) or datasets_io.is_complete(out):
                continue
            tasks = resources_of(config, stage).tasks if stage.shardable else 1
            after = [key for source in pipeline.inputs_at(stage, epoch, config.max_staleness) for key in writers.get(source, [])]
            # Several teachers: one score job (array) per teacher, each over its own shards of the dataset.
            parts = teachers if stage is pipeline.SCORE and len(teachers) > 1 else [None]
            missing = {t: missing_shards(out, tasks, i * tasks, tasks * len(parts)) for i, t in enumerate(parts)}
            if not any(missing.values()):  # every shard done, the manifest never written: a re-run writes it
                missing[parts[0]] = [0]
            for teacher, shards in missing.items():
                if not shards:
                    continue
                array = ",".join(map(str, shards)) if tasks > 1 else ""
                command = stage.command if teacher is None else f"{stage.command}-{teacher}"
                key = f"{epoch}-{command}"
                script = render(config, epoch, stage, python, workdir, array, teacher)
                jobs.append(Job(key, job_name(config, epoch, command), script, after, array))
                writers.setdefault((epoch, stage.output), []).append(key)
    return jobs


def sbatch(script: Path, dependencies: list[str]) -> str:
    args = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes"]
    if dependencies:
        args.append("--dependency=afterok:" + ":".join(dependencies))
    try:
        done = subprocess.run([*args, str(script)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise KdError("sbatch not found: run `kd slurm` on a Slurm login node (or use --dry-run)") from None
    if done.returncode != 0:
        raise KdError(f"{script}: sbatch refused it ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})")
    return done.stdout.strip().split(";")[0]


def submit(config: Config, jobs: list[Job]) -> dict[str, str]:
    """Write each job's script under runs/<id>/slurm/ and sbatch it; {job key: Slurm job id}."""
    folder = config.run_dir / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    for job in jobs:
        script = folder / f"{job.name}.sbatch"
        script.write_text(job.script)
        ids[job.key] = sbatch(script, [ids[key] for key in job.after])
    return ids


def queued(config: Config) -> dict[str, str]:
    """{job name: state} of this run's jobs that Slurm still lists (pending, running, ...); {} without Slurm."""
    try:
        listed = subprocess.run(["squeue", "-h", "-o", "%j|%T"], capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    prefix = f"kd-{config.run_id}-"
    states: dict[str, str] = {}
    for line in listed.stdout.splitlines():
        name, _, state = line.partition("|")
        if name.startswith(prefix):
            # An array lists a line per task: running wins over pending for the summary.
            states[name] = state.lower() if states.get(name) != "running" else "running"
    return states


def wait(config: Config, poll_seconds: float = 2.0) -> None:
    """Block until Slurm lists none of this run's jobs."""
    while queued(config):
        time.sleep(poll_seconds)
