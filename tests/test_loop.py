"""The whole loop through the real CLI, in subprocesses (tier 3): learning, kill-and-resume, refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd.stages import datasets_io


def kd(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kd.cli.main", *args], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=900,
    )


def heldout_kl(run_dir: Path) -> dict[int, float]:
    return {
        r["epoch"]: r["heldout_reverse_kl"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["stage"] == "eval"
    }


def test_loop_lowers_heldout_kl_and_resumes_after_a_kill(toy_config_file, tmp_path):
    """Three epochs of the default toy loop, killed inside epoch 1 and re-run."""
    config = toy_config_file(epochs=3, **{"eval.every": 3})
    run_dir = tmp_path / "runs" / "toy"
    killed = kd("loop", "--config", str(config), env={"KD_FAULT_KILL": "0001/scored:staged"})
    assert killed.returncode == -9, killed.stderr
    assert datasets_io.is_complete(run_dir / "0001" / "rollouts")
    assert not (run_dir / "0001" / "scored").exists()
    assert list((run_dir / "0001").glob(".scored.tmp-*"))  # the staged copy the kill left behind

    resumed = kd("loop", "--config", str(config))
    assert resumed.returncode == 0, resumed.stderr
    assert "held-out evaluation" in resumed.stderr
    for epoch in range(3):
        for stage in ("rollouts", "scored", "train", "adapter"):
            assert datasets_io.is_complete(run_dir / f"{epoch:04d}" / stage), (epoch, stage)
    kl = heldout_kl(run_dir)
    assert set(kl) == {0, 3}
    assert kl[3] < 0.9 * kl[0], kl
    report = run_dir / "report"  # kd report, written by the loop
    for figure in ("kl.png", "accuracy.png", "ratios.png", "mismatch.png", "throughput.png"):
        assert (report / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    assert f"-> {kl[3]:.4f} after 3" in (report / "report.md").read_text()

    manifests = {p: p.stat().st_mtime_ns for p in run_dir.rglob("manifest.json")}
    again = kd("loop", "--config", str(config))  # nothing left to do: every stage is skipped
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("manifest.json")} == manifests


def test_config_change_on_existing_run_is_refused(config_file, tmp_path):
    config = config_file(epochs=1, **{"eval.every": 5, "eval.num_prompts": 4})
    first = kd("generate", "--config", str(config), "--epoch", "0")
    assert first.returncode == 0, first.stderr
    changed = kd("generate", "--config", str(config), "--epoch", "0", "--set", "train.learning_rate=0.5")
    assert changed.returncode == 2
    assert changed.stderr.count("\n") == 1 and "train.learning_rate" in changed.stderr
    # The run's own config is the default for later stage commands.
    scored = kd("score", "--run", "t", "--epoch", "0", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert datasets_io.is_complete(tmp_path / "runs" / "t" / "0000" / "scored")
    extended = kd("generate", "--config", str(config), "--epoch", "0", "--set", "epochs=7")
    assert extended.returncode == 0, extended.stderr  # more epochs is the same run, extended
    top_k = kd("score", "--run", "t", "--epoch", "0", "--top-k", "4", cwd=tmp_path)
    assert top_k.returncode == 2 and "score.top_k" in top_k.stderr  # K is part of the run's config


def test_epochs_of_a_run_with_a_decaying_schedule_are_fixed_once_it_trained(config_file, tmp_path):
    # A cosine learning rate at every step depends on epochs x steps per epoch: growing epochs after
    # a train stage would silently put the steps already taken on another schedule.
    config = config_file(epochs=1, **{"eval.every": 5, "eval.num_prompts": 4, "train.lr_scheduler": "cosine"})
    assert kd("generate", "--config", str(config), "--epoch", "0").returncode == 0
    resized = kd("score", "--run", "t", "--epoch", "0", "--set", "epochs=2", cwd=tmp_path)
    assert resized.returncode == 0, resized.stderr  # nothing trained yet: the schedule has not started
    trained = kd("train", "--run", "t", "--epoch", "0", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    grown = kd("export-lora", "--run", "t", "--epoch", "0", "--set", "epochs=3", cwd=tmp_path)
    assert grown.returncode == 2 and grown.stderr.count("\n") == 1, grown.stderr
    assert "epochs 2 -> 3" in grown.stderr and "lr_scheduler cosine" in grown.stderr
    assert not (tmp_path / "runs" / "t" / "0000" / "adapter").exists()
    assert kd("export-lora", "--run", "t", "--epoch", "0", cwd=tmp_path).returncode == 0


def test_a_run_can_move_to_another_server_of_its_engine(config_file, tmp_path):
    config = config_file(**{"score.engine.kind": "vllm", "score.engine.server": "http://127.0.0.1:9"})
    assert kd("generate", "--config", str(config), "--epoch", "0").returncode == 0
    # --set is applied to the run's own config (vllm), not to the default one (hf, which has no server mode)
    moved = kd("generate", "--run", "t", "--epoch", "0", "--set", "score.engine.server=http://127.0.0.1:10", cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr
    assert "http://127.0.0.1:10" in (tmp_path / "runs" / "t" / "config.yaml").read_text()
    other_engine = kd("generate", "--run", "t", "--epoch", "0", "--set", "score.engine.kind=hf",
                      "--set", "score.engine.server=\"\"", cwd=tmp_path)
    assert other_engine.returncode == 2 and "score.engine.kind" in other_engine.stderr  # the engine is part of the results


def test_score_top_k_option_starts_a_top_k_run(config_file, tmp_path):
    config = config_file(epochs=1, **{"eval.every": 5, "eval.num_prompts": 4})
    assert kd("generate", "--config", str(config), "--run", "k", "--epoch", "0", "--set", "score.top_k=4").returncode == 0
    scored = kd("score", "--run", "k", "--epoch", "0", "--top-k", "4", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert datasets_io.read_manifest(tmp_path / "runs" / "k" / "0000" / "scored")["stats"]["top_k"] == 4


def test_cli_help_lists_every_command():
    out = kd("--help").stdout
    for command in ("toy", "generate", "score", "train", "export-lora", "eval", "loop", "inspect", "report", "verify"):
        assert command in out


def test_sampler_devices_count_among_the_gpus_the_loop_sees(monkeypatch):
    """Under Slurm CUDA_VISIBLE_DEVICES holds the job's GPUs: overlap.sampler_devices "1" is the
    second of them, not physical GPU 1; past them is one line naming the field."""
    from kd.stages.errors import KdError
    from kd.stages.loop import visible_devices

    assert visible_devices("1", "4,5") == "5"
    assert visible_devices("0,1", "6,7,2") == "6,7"
    assert visible_devices("", "4,5") == ""  # the trainer's GPUs
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_devices("1,2") == "1,2"  # nothing hidden: the indices are the GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert visible_devices("0") == "3"
    with pytest.raises(KdError, match=r"overlap.sampler_devices: GPU 2 is not among the 2 this process sees "
                                      r"\(CUDA_VISIBLE_DEVICES=4,5\)"):
        visible_devices("1,2", "4,5")
    with pytest.raises(KdError, match="GPU 0 is not among the 0"):
        visible_devices("0", "")  # set but empty: no GPU
