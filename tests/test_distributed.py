"""`kd train` under `accelerate launch --num_processes 2` on CPU (DDP over gloo, real processes) gives
the adapter of one process for the same effective batch; `kd slurm --dry-run` writes the chain."""

from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import load_file

from kd.stages import datasets_io, generate, rundir, score
from kd.stages.schemas import SCORED
from kd.stages.session import Session
from tests.test_loop import kd

CPU_DDP = "configs/accelerate/cpu-ddp.yaml"


def accelerate_train(config_file, processes: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_DDP, "--num_processes", str(processes),
         "--num_cpu_threads_per_process", "1", "-m", "kd.cli.main", "train", "--config", str(config_file), "--epoch", "0"],
        capture_output=True, text=True, timeout=600,
    )


def test_two_processes_train_the_one_process_adapter(config_file, make_config, tmp_path):
    # One sequence per process per micro-batch, so the two processes hold different token counts:
    # a per-process loss normaliser would weight their tokens differently and change the update.
    overrides = {"train.batch_size": 2, "train.grad_accum": 4, "epochs": 2}
    runs = {}
    for processes in (1, 2):
        config = make_config(run_id=f"p{processes}", **overrides)
        rundir.prepare(config)
        with Session(config, progress=False) as session:
            generate.run(config, 0, session)
            score.run(config, 0, session)
        path = config_file(run_id=f"p{processes}", **overrides)
        done = accelerate_train(path, processes) if processes > 1 else kd("train", "--config", str(path), "--epoch", "0")
        assert done.returncode == 0, done.stderr[-3000:]
        runs[processes] = config.run_dir / "0000" / "train"

    lengths = [len(c) for c in datasets_io.read_table(runs[1].parent / "scored", SCORED).column("completion_token_ids").to_pylist()]
    assert len(set(lengths)) > 4, lengths  # sequences of many lengths: processes' token counts differ
    one, two = (load_file(runs[p] / "adapter" / "adapter_model.safetensors") for p in (1, 2))
    assert one.keys() == two.keys()
    scale = max(float(t.abs().max()) for t in one.values())
    gap = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert scale > 1e-3 and gap < 1e-4 * max(scale, 1.0), (gap, scale)
    steps = {p: datasets_io.read_table(runs[p], datasets_io.kind_of(runs[p])).to_pylist() for p in (1, 2)}
    assert len(steps[1]) == len(steps[2]) == 2  # 16 samples / (2 x 4): the schedule does not change with processes
    for a, b in zip(steps[1], steps[2]):  # step metrics describe the whole batch, not rank 0's half
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["teacher_kl"] == pytest.approx(b["teacher_kl"], rel=1e-5)


def test_batch_that_does_not_split_over_processes_is_refused(config_file, make_config):
    config = make_config(run_id="odd", **{"train.batch_size": 3})
    rundir.prepare(config)
    with Session(config, progress=False) as session:
        generate.run(config, 0, session)
        score.run(config, 0, session)
    done = accelerate_train(config_file(run_id="odd", **{"train.batch_size": 3}), 2)
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
