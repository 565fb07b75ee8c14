"""One toy epoch on Slurm: 1 vs 2 array tasks, 1 vs 2 training processes, and what Slurm adds.

    python bench/slurm.py            (just bench-slurm; needs slurm-wlm and munge, as .ci/run installs)

Starts a real single-node Slurm on this machine (tests/slurm_cluster.py), builds nothing new (the
toy world of configs/toy.yaml must exist: `kd toy`), and submits epoch 0 of the toy config (its
objective as measured: bench/toy_before.py) with
`kd slurm --wait` in three shapes, each a fresh run:
  A: generate and score as 1 task, train as 1 process;
  B: generate and score as 2-task arrays, train as 1 process;
  C: as B, with train as 2 processes (accelerate launch, DDP over gloo).
The held-out eval of epoch 0 is computed before submitting, so that no eval job competes for the
two cores during the epoch. Each job script (a template of our own, through slurm.template) logs
its start and end with a nanosecond clock; from those and the stages' own wall_seconds:
  - epoch wall: first generate task start -> export-lora end;
  - Slurm gap per stage: end of the job it waited for -> this job's start (queueing, dependency
    resolution, launch);
  - process overhead per stage: job start -> end minus the stage's wall_seconds (Python start,
    imports, model load, accelerate/torchrun start-up).
Also `kd train` of the same scored epoch directly (no Slurm): 1 vs 2 processes.
Writes bench/results/slurm.json and bench/results/slurm.md. One run per shape, on this machine.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.slurm_cluster: the same local Slurm the test suite starts

from kd.stages import pipeline  # noqa: E402
from tests.slurm_cluster import LocalSlurm  # noqa: E402
from toy_before import SAMPLED_TOKEN_CONSTANT_LR  # noqa: E402  bench/ is on sys.path: run as `python bench/slurm.py`

RESULTS = ROOT / "bench" / "results"
SHAPES = {
    "A: 1 task, 1 process": {"generate": 1, "score": 1, "train": 1},
    "B: 2 tasks, 1 process": {"generate": 2, "score": 2, "train": 1},
    "C: 2 tasks, 2 processes": {"generate": 2, "score": 2, "train": 2},
}
STAGES = tuple(stage.command for stage in pipeline.EPOCH)
OUTPUTS = {stage.command: stage.output for stage in pipeline.EPOCH}


def timed_template(folder: Path) -> Path:
    """The packaged template plus a nanosecond clock at the job's start and end."""
    text = (ROOT / "configs" / "slurm" / "stage.sbatch").read_text()
    text = text.replace("${command}", 'echo "kd-bench-start $$(date +%s.%N)"\n${command}\necho "kd-bench-end $$(date +%s.%N)"')
    path = folder / "timed.sbatch"
    path.write_text(text)
    return path


def kd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "kd.cli.main", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"kd {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def clock(run_dir: Path, stage: str) -> tuple[float, float]:
    """(earliest start, latest end) over the job's logs (several for an array)."""
    starts, ends = [], []
    for log in (run_dir / "slurm" / "logs").glob(f"kd-*-0000-{stage}-*.out"):
        text = log.read_text()
        starts += [float(x) for x in re.findall(r"kd-bench-start (\S+)", text)]
        ends += [float(x) for x in re.findall(r"kd-bench-end (\S+)", text)]
    return min(starts), max(ends)


def shape_run(name: str, tasks: dict, template: Path, env: dict) -> dict:
    run_id = "bench-slurm-" + name[0].lower()
    run_dir = ROOT / "runs" / run_id
    shutil.rmtree(run_dir, ignore_errors=True)
    settings = [*SAMPLED_TOKEN_CONSTANT_LR, f"run_id={run_id}", "epochs=1", "eval.every=1", f"slurm.template={template}",
                f"slurm.generate.tasks={tasks['generate']}", f"slurm.score.tasks={tasks['score']}",
                f"slurm.train.tasks={tasks['train']}", f"slurm.train.cpus={max(1, tasks['train'])}"]
    overrides = [arg for s in settings for arg in ("--set", s)]
    kd("eval", "--epoch", "0", *overrides)  # before the epoch: no eval job shares the cores with it
    submitted_at = time.time()
    kd("slurm", *overrides, "--wait", env=env)
    clocks = {stage: clock(run_dir, stage) for stage in STAGES}
    walls = {stage: json.loads((run_dir / "0000" / OUTPUTS[stage] / "manifest.json").read_text())["wall_seconds"]
             for stage in STAGES}
    rows, previous_end = {}, submitted_at
    for stage in STAGES:
        start, end = clocks[stage]
        # A sharded stage's wall_seconds sums its shards; per task it is the sum over tasks / tasks.
        per_task = walls[stage] / (tasks.get(stage, 1) if stage in ("generate", "score") else 1)
        rows[stage] = {"slurm_gap_s": start - previous_end, "job_s": end - start, "stage_wall_s": per_task,
                       "process_overhead_s": end - start - per_task}
        previous_end = end
    kl = json.loads((run_dir / "0001" / "eval" / "manifest.json").read_text())["stats"]["heldout_reverse_kl"]
    return {"tasks": tasks, "epoch_wall_s": clocks["export-lora"][1] - clocks["generate"][0],
            "submit_to_adapter_s": clocks["export-lora"][1] - submitted_at, "stages": rows,
            "heldout_kl_after": kl}


def direct_train(processes: int) -> float:
    """Wall seconds of `kd train` on run A's scored epoch 0 (a copy), 1 or 2 processes, no Slurm."""
    source = ROOT / "runs" / "bench-slurm-a"
    target = ROOT / "runs" / f"bench-train-{processes}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copytree(source / "0000" / "rollouts", target / "0000" / "rollouts")
    shutil.copytree(source / "0000" / "scored", target / "0000" / "scored")
    config = yaml_config(source, target.name)
    command = [sys.executable, "-m", "kd.cli.main", "train", "--config", str(config), "--epoch", "0"]
    if processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "configs" / "accelerate" / "cpu-ddp.yaml"), "--num_processes", str(processes),
                   "--num_cpu_threads_per_process", "1", *command[1:]]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    stage = json.loads((target / "0000" / "train" / "manifest.json").read_text())["wall_seconds"]
    shutil.rmtree(target)
    return {"command_s": seconds, "stage_wall_s": stage}


def yaml_config(source: Path, run_id: str) -> Path:
    import yaml

    data = yaml.safe_load((source / "config.yaml").read_text())
    data["run_id"] = run_id
    path = Path(tempfile.mkdtemp()) / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def versions() -> dict:
    slurm = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "slurm-wlm"], capture_output=True, text=True).stdout
    import accelerate
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "accelerate": accelerate.__version__,
            "slurm": slurm, "cpus": os.cpu_count()}


def markdown(results: dict) -> str:
    lines = [
        "# One toy epoch on Slurm: array tasks, training processes, Slurm overhead", "",
        f"Machine: {results['machine']}; {results['versions']}; {results['date']}. One run per shape; "
        "toy config (256 samples per epoch, batch 128, hf engine, float32), a real single-node Slurm on this "
        "2-core machine (tests/slurm_cluster.py). Times from the job scripts' own clock.", "",
        "| shape | epoch wall s | submit -> adapter s | held-out KL after |", "|---|---|---|---|",
    ]
    for name, r in results["shapes"].items():
        lines.append(f"| {name} | {r['epoch_wall_s']:.1f} | {r['submit_to_adapter_s']:.1f} | {r['heldout_kl_after']:.4f} |")
    lines += ["", "Per stage: Slurm gap (the job it waited for ends -> this job starts; for generate, from calling "
              "`kd slurm`, which also starts Python and runs sbatch once per job), job time, the stage's own wall "
              "time per task (includes loading its model), and the process overhead (job time - stage time: "
              "Python start, imports, accelerate/torchrun start-up).", "",
              "| shape | stage | Slurm gap s | job s | stage s | process overhead s |", "|---|---|---|---|---|---|"]
    for name, r in results["shapes"].items():
        for stage, row in r["stages"].items():
            lines.append(f"| {name[0]} | {stage} | {row['slurm_gap_s']:.2f} | {row['job_s']:.2f} | "
                         f"{row['stage_wall_s']:.2f} | {row['process_overhead_s']:.2f} |")
    lines += ["", "`kd train` on the same scored epoch without Slurm:", "",
              "| processes | command s | stage s |", "|---|---|---|"]
    for processes, row in results["direct_train"].items():
        lines.append(f"| {processes} | {row['command_s']:.1f} | {row['stage_wall_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kd-bench-slurm-") as folder, LocalSlurm(Path(folder) / "slurm") as cluster:
        template = timed_template(Path(folder))
        env = {**cluster.env}
        shapes = {name: shape_run(name, tasks, template, env) for name, tasks in SHAPES.items()}
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "versions": versions(),
        "date": time.strftime("%Y-%m-%d"), "shapes": shapes,
        "direct_train": {processes: direct_train(processes) for processes in (1, 2)},
    }
    (RESULTS / "slurm.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "slurm.md").write_text(markdown(results))
    print(markdown(results))
    for name in SHAPES:
        shutil.rmtree(ROOT / "runs" / ("bench-slurm-" + name[0].lower()), ignore_errors=True)


if __name__ == "__main__":
    main()
