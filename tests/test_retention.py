"""Retention (keep_epochs, keep_adapters_every) on real runs through the CLI: what is removed and
when, and that a pruned run resumes after a kill inside a removal, grows, verifies, reports, shows its
status and plans Slurm jobs, ending with the adapters of a run that keeps everything."""

from __future__ import annotations

import json

import pytest

from kd.stages import config as config_lib, datasets_io, slurm
from tests.test_loop import kd

pytestmark = pytest.mark.slow
EPOCH_DATASETS = ("rollouts", "scored", "train", "adapter")


def adapter_bytes(run_dir, epoch: int) -> bytes:
    return (run_dir / f"{epoch:04d}" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_pruned_run_resumes_grows_verifies_and_ends_where_a_full_run_does(config_file, tmp_path):
    config = config_file(epochs=4, **{"eval.every": 2, "eval.num_prompts": 4})
    runs = tmp_path / "runs"
    kept = ["--run", "kept", "--set", "keep_epochs=1", "--set", "keep_adapters_every=2"]

    killed = kd("loop", "--config", str(config), *kept, env={"KD_FAULT_KILL": "0000/rollouts:pruned"})
    assert killed.returncode == -9, killed.stderr  # recorded as pruned, not yet removed
    run_dir = runs / "kept"
    assert "rollouts" in json.loads((run_dir / "0000" / datasets_io.PRUNED).read_text())
    assert (run_dir / "0000" / "rollouts" / datasets_io.MANIFEST).is_file()

    resumed = kd("loop", "--config", str(config), *kept)
    assert resumed.returncode == 0, resumed.stderr
    for epoch in range(3):  # older than the newest trained epoch, every reader done
        record = json.loads((run_dir / f"{epoch:04d}" / datasets_io.PRUNED).read_text())
        pruned = {"rollouts", "scored", "train"} | ({"adapter"} if epoch != 1 else set())
        assert set(record) == pruned, (epoch, record)
        for name in EPOCH_DATASETS:
            assert (run_dir / f"{epoch:04d}" / name).exists() == (name not in pruned), (epoch, name)
            assert datasets_io.is_complete(run_dir / f"{epoch:04d}" / name)
        assert record["scored"]["rows"] > 0 and record["train"]["bytes"] > 0
    assert all((run_dir / f"0003/{name}/{datasets_io.MANIFEST}").is_file() for name in EPOCH_DATASETS)
    assert sorted(p.parent.name for p in run_dir.glob("*/eval")) == ["0000", "0002", "0004"]  # evals are kept
    assert not list(run_dir.glob("*/.*.pruning"))

    verified = kd("verify", str(run_dir))
    assert verified.returncode == 0, verified.stderr
    assert "11 more removed by retention" in verified.stdout, verified.stdout
    status = kd("status", str(run_dir))
    assert status.returncode == 0 and status.stdout.count(" pruned ") == 11, status.stdout
    saved = config_lib.load(run_dir / "config.yaml")
    assert slurm.plan(saved) == []  # nothing to redo: pruned datasets count as done
    grown = config_lib.load(run_dir / "config.yaml", ["epochs=6"])
    assert {int(job.key.split("-")[0]) for job in slurm.plan(grown)} == {4, 5, 6}

    extended = kd("loop", "--config", str(config), *kept, "--set", "epochs=6")
    assert extended.returncode == 0, extended.stderr
    assert (run_dir / "report" / "report.md").is_file()
    assert not (run_dir / "0004" / "train").exists() and (run_dir / "0005" / "train").is_dir()
    reference = kd("loop", "--config", str(config), "--run", "full", "--set", "epochs=6")
    assert reference.returncode == 0, reference.stderr
    for epoch in (1, 3, 5):  # retention changes what is kept, never what is computed
        assert adapter_bytes(run_dir, epoch) == adapter_bytes(runs / "full", epoch), epoch
    assert not list((runs / "full").glob(f"*/{datasets_io.PRUNED}"))


def test_an_overlapped_run_keeps_what_its_stale_sampler_and_the_trainer_still_read(config_file, tmp_path):
    config = config_file(epochs=4, max_staleness=1, keep_epochs=2, **{"eval.every": 4, "eval.num_prompts": 4})
    done = kd("loop", "--config", str(config))
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "runs" / "t"
    assert sorted(p.parent.name for p in run_dir.glob(f"*/{datasets_io.PRUNED}")) == ["0000", "0001"]
    assert all((run_dir / f"{epoch:04d}" / name).is_dir() for epoch in (2, 3) for name in EPOCH_DATASETS)
    assert kd("verify", str(run_dir)).returncode == 0
