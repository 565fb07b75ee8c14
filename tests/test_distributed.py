"""`kd train` under `accelerate launch` on CPU (DDP over gloo, real processes): two processes on one
machine, or one on each of two machines (two launches on this host, machine ranks 0 and 1), give the
adapter of one process for the same effective batch; `kd slurm --dry-run` writes the chain, and for
slurm.train.nodes > 1 a launch on each node."""

from __future__ import annotations

import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from kd.stages import datasets_io, generate, rundir, score
from kd.stages.schemas import SCORED
from kd.stages.session import Session
from tests.conftest import tiny_config
from tests.slurm_cluster import free_port
from tests.test_loop import kd

CPU_DDP = "configs/accelerate/cpu-ddp.yaml"
# One sequence per process per micro-batch, so the two processes hold different token counts:
# a per-process loss normaliser would weight their tokens differently and change the update.
SPLIT = {"train.batch_size": 2, "train.grad_accum": 4, "epochs": 2}


def accelerate_train(config_file, processes: int, machines: int = 1) -> list[subprocess.CompletedProcess]:
    """`kd train --epoch 0` under `accelerate launch`, `processes` in all; with `machines` > 1, one
    launch per machine rank, all on this host and meeting at 127.0.0.1: what kd slurm's srun runs on
    each node of slurm.train.nodes (kd.stages.slurm.on_each_node). One result per launch."""
    meet = ["--num_machines", str(machines), "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]

    def launch(rank: int) -> subprocess.CompletedProcess:
        machine = [*meet, "--machine_rank", str(rank)] if machines > 1 else []
        return subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_DDP, "--num_processes", str(processes),
             *machine, "--num_cpu_threads_per_process", "1",
             "-m", "kd.cli.main", "train", "--config", str(config_file), "--epoch", "0"],
            capture_output=True, text=True, timeout=600,
        )

    # Concurrently: each machine's processes wait for the others' at the rendezvous.
    with ThreadPoolExecutor(machines) as pool:
        return list(pool.map(launch, range(machines)))


def scored_run(world: Path, runs: Path, run_id: str, **overrides) -> Path:
    """A tiny-world run with epoch 0 generated and scored in this process; its config file."""
    config = tiny_config(world, runs, run_id=run_id, **overrides)
    rundir.prepare(config)
    with Session(config, progress=False) as session:
        generate.run(config, 0, session)
        score.run(config, 0, session)
    path = runs / f"{run_id}.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def adapter_gap(one: Path, other: Path) -> tuple[float, float]:
    """Max abs difference between two train/ directories' adapter tensors, and the first's max abs value."""
    first, second = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (one, other))
    assert first.keys() == second.keys()
    return max(float((first[k] - second[k]).abs().max()) for k in first), max(float(t.abs().max()) for t in first.values())


@pytest.fixture(scope="module")
def one_process(tiny_world, tmp_path_factory) -> Path:
    """train/ of epoch 0 trained by one process (plain `kd train`): what every layout must train."""
    runs = tmp_path_factory.mktemp("one-process")
    done = kd("train", "--config", str(scored_run(tiny_world, runs, "p1", **SPLIT)), "--epoch", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    return runs / "p1" / "0000" / "train"


@pytest.mark.parametrize("machines", [1, 2], ids=["one-machine", "two-machines"])
def test_two_processes_train_the_one_process_adapter(machines, one_process, tiny_world, tmp_path):
    """Two processes: on one machine, or one on each of two "machines" (accelerate's --num_machines 2,
    machine ranks 0 and 1), which are both this host: there is no second host here. Each process
    then takes batch_size / 2 only if it counts the processes of both machines (WORLD_SIZE).
    tests/test_slurm.py runs kd slurm's two-node train job on two slurmd nodes of this host."""
    config_file = scored_run(tiny_world, tmp_path / "runs", f"m{machines}", **SPLIT)
    for done in accelerate_train(config_file, 2, machines):
        assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "runs" / f"m{machines}" / "0000" / "train"
    # Each step's row is logged as it is taken, by the main process alone: once per step.
    assert (two.parent.parent / "metrics.jsonl").read_text().count('"stage": "train_step"') == 2

    lengths = [len(c) for c in datasets_io.read_table(one_process.parent / "scored", SCORED).column("completion_token_ids").to_pylist()]
    assert len(set(lengths)) > 4, lengths  # sequences of many lengths: processes' token counts differ
    gap, scale = adapter_gap(one_process, two)
    assert scale > 1e-3 and gap < 1e-4 * max(scale, 1.0), (gap, scale)
    steps = [datasets_io.read_table(d, datasets_io.kind_of(d)).to_pylist() for d in (one_process, two)]
    assert len(steps[0]) == len(steps[1]) == 2  # 16 samples / (2 x 4): the schedule does not change with processes
    for a, b in zip(*steps):  # step metrics describe the whole batch, not rank 0's half
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["teacher_kl"] == pytest.approx(b["teacher_kl"], rel=1e-5)


def test_batch_that_does_not_split_over_processes_is_refused(tiny_world, tmp_path):
    [done] = accelerate_train(scored_run(tiny_world, tmp_path / "runs", "odd", **{"train.batch_size": 3}), 2)
    assert done.returncode != 0 and "train.batch_size: 3 sequences do not split over 2 processes" in done.stderr


def test_slurm_dry_run_prints_the_chain(config_file, tmp_path):
    config = config_file(**{"epochs": 2, "eval.every": 2, "slurm.generate.tasks": 3, "slurm.train.tasks": 2,
                            "slurm.train.gpus": 2, "slurm.partition": "gpu", "slurm.setup": "module load cuda"})
    done = kd("slurm", "--config", str(config), "--dry-run")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "10 jobs (dry run: nothing submitted)" in out  # 2 x (generate, score, train, export-lora) + eval at 0 and 2
    assert not (tmp_path / "runs" / "t").exists()  # a dry run writes nothing
    assert out.count("#SBATCH --array=0,1,2\n") == 2 and out.count("#SBATCH --array=0,1\n") == 2  # generate 3, score 2
    assert "--dependency=afterok:<0-export-lora> kd-t-0001-generate.sbatch" in out
    assert "--dependency=afterok:<1-export-lora> kd-t-0002-eval.sbatch" in out
    assert "#SBATCH --gres=gpu:2" in out and "#SBATCH --partition=gpu" in out and "module load cuda" in out
    assert "accelerate.commands.launch --config_file" in out and "accelerate/ddp.yaml --num_processes 2" in out
    assert "--shard $SLURM_ARRAY_TASK_ID --num-shards 3" in out


def test_slurm_train_on_two_nodes_launches_accelerate_on_each_node(config_file, tmp_path):
    config = config_file(**{"epochs": 1, "slurm.train.nodes": 2, "slurm.train.tasks": 4, "slurm.train.gpus": 4,
                            "slurm.train.cpus": 32})
    done = kd("slurm", "--config", str(config), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("#SBATCH --nodes=") == 1  # train's job only
    train = done.stdout.split("# <0-train>")[1].split("\n# <")[0]
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --gres=gpu:4\n" in train  # per node
    assert 'KD_MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\nexport KD_MAIN_HOST\n' in train
    [srun] = [line for line in train.splitlines() if line.startswith("srun ")]
    *options, per_node = shlex.split(srun)
    assert options == ["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=32", "--kill-on-bad-exit=1", "bash", "-c"]
    # Quoted for the node's shell: the rank, host and port expand there, not in the batch script.
    assert per_node.startswith("exec ") and "accelerate/ddp.yaml --num_processes 8 " in per_node  # 2 nodes x 4
    assert "--num_cpu_threads_per_process 8 --main_process_port $((20000 + SLURM_JOB_ID % 20000)) " in per_node
    assert "--num_machines 2 --machine_rank $SLURM_NODEID --main_process_ip $KD_MAIN_HOST -m kd.cli.main train " in per_node
    script = tmp_path / "train.sbatch"
    script.write_text(train)
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
