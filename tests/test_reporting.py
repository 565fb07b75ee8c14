"""Live metrics: each optimiser step's row reaches metrics.jsonl, TensorBoard and W&B while train runs;
a killed and re-run train stage leaves one row per step to `kd report`; a resumed run logs to the
same W&B group. W&B runs offline here (WANDB_MODE=offline) and is read back with its own CLI; a W&B
that cannot start (no server) costs one warning line and no work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kd.stages import reporters, rundir
from tests.test_loop import kd

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def wandb_records(run_dir: Path) -> list[list[dict]]:
    """Each offline W&B run under run_dir/wandb/ (one per process that logged), oldest first, as the
    records of its .wandb log (`wandb leet inspect --json`: one JSON object per record)."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    out = []
    for run in runs:
        text = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run)],
                              capture_output=True, text=True, check=True, timeout=120).stdout
        out.append([json.loads(line) for line in text.splitlines() if line.startswith("{")])
    return out


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def test_loop_logs_each_step_live_to_metrics_tensorboard_and_wandb_and_resumes_the_wandb_run(config_file, tmp_path):
    config = config_file(epochs=2, report_to="[tensorboard, wandb]", **{
        "eval.every": 2, "eval.num_prompts": 4, "train.grad_accum": 1, "wandb.tags": "[toy, test]"})
    run_dir = tmp_path / "runs" / "t"
    # Killed after epoch 1's optimiser steps (its adapter saved, the optimiser state not yet): the
    # re-run trains epoch 1 again from epoch 0's checkpoint and logs its steps again.
    killed = kd("loop", "--config", str(config), env={**OFFLINE, "KD_FAULT_KILL": "0001/train:checkpoint"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_before = [r["global_step"] for r in lines if r["stage"] == reporters.TRAIN_STEP]
    resumed = kd("loop", "--config", str(config), env=OFFLINE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    written = [r for r in lines if r["stage"] == reporters.TRAIN_STEP]
    records = rundir.read_metrics(run_dir)
    steps = [r for r in records if r["stage"] == reporters.TRAIN_STEP]
    per_epoch = len(steps) // 2
    assert [r["global_step"] for r in steps] == list(range(1, 2 * per_epoch + 1))
    assert steps_before == list(range(1, 2 * per_epoch + 1))  # epoch 1's steps were logged before the kill
    assert len(written) == 3 * per_epoch  # ... and again by the re-run; readers keep the last of each
    redone = {r["global_step"]: r for r in written[per_epoch: 2 * per_epoch]}
    for row in steps[per_epoch:]:
        assert row["time"] > redone[row["global_step"]]["time"]
        assert {k: v for k, v in row.items() if k != "time"} == {k: v for k, v in redone[row["global_step"]].items() if k != "time"}
    # Live: each step's row is written before its train stage's own record, which comes at the stage's end.
    for epoch in (0, 1):
        (stage,) = [i for i, r in enumerate(lines) if r["stage"] == "train" and r["epoch"] == epoch]
        mine = [i for i, r in enumerate(lines) if r["stage"] == reporters.TRAIN_STEP and r["epoch"] == epoch]
        assert mine and max(mine) < stage and lines[mine[0]]["time"] < lines[stage]["time"]
    assert (run_dir / "report" / "report.md").is_file()  # kd report read the twice-logged run

    # Piped, the loop prints one plain line per epoch (no bars, no wrapping).
    epoch_lines = [line for line in resumed.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"], resumed.stderr[-3000:]  # epoch 0's from its manifests
    assert "teacher_kl" in epoch_lines[0] and epoch_lines[0].rstrip().endswith("s")

    # TensorBoard: train/<field> over the global step, eval/<field> over the epoch.
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    board = EventMultiplexer({"run": str(run_dir / "tb")}).Reload()
    loss = board.Scalars("run", "train/loss")
    assert sorted({e.step for e in loss}) == list(range(1, 2 * per_epoch + 1))
    assert {e.step for e in board.Scalars("run", "eval/heldout_reverse_kl")} == {0, 2}

    # W&B: offline, one W&B run per process (W&B does not resume offline runs), both in the group
    # that runs/t/wandb-id names. The killed process's records are not asserted: W&B writes its
    # .wandb file every 15 s, and SIGKILL lost them.
    wandb_id = (run_dir / "wandb-id").read_text().strip()
    own_ids = [path.name.rsplit("-", 1)[1] for path in sorted((run_dir / "wandb").glob("offline-run-*"))]
    assert len(set(own_ids)) == 2 and wandb_id not in own_ids, own_ids
    resumed_run = wandb_records(run_dir)[1]
    (run,) = [r["run"] for r in resumed_run if r["type"] == "run"]
    assert (run["run_id"], run["run_group"], run["display_name"], run["project"], run["tags"]) == (
        own_ids[1], wandb_id, "t", "kd", ["toy", "test"])
    config_seen = {key: value for r in resumed_run if r["type"] == "config" for key, value in r["config"]["update"].items()}
    assert config_seen["train"]["grad_accum"] == 1 and config_seen["report_to"] == ["tensorboard", "wandb"]
    logged = {row["train/global_step"]: row for row in history(resumed_run) if "train/loss" in row}
    assert sorted(logged) == [r["global_step"] for r in steps[per_epoch:]]  # the steps the re-run took
    for row in steps[per_epoch:]:
        got = logged[row["global_step"]]
        assert got["train/loss"] == row["loss"] and got["train/learning_rate"] == row["learning_rate"]
        assert got["train/grad_norm"] == row["grad_norm"] and got["train/epoch"] == 1
    evals = [row for row in history(resumed_run) if "eval/heldout_reverse_kl" in row]
    (final,) = [r for r in records if r["stage"] == "eval" and r["epoch"] == 2]
    assert [(row["epoch"], row["eval/heldout_reverse_kl"]) for row in evals] == [(2, final["heldout_reverse_kl"])]


def test_overlapped_loop_sends_the_sampling_sides_records_to_its_one_wandb_run(config_file, tmp_path):
    """max_staleness 1: eval, generate and score run in the sampling side's process, which hands its
    records to the loop's process, the one W&B writer. Without tensorboard in report_to, no tb/."""
    config = config_file(epochs=1, max_staleness=1, report_to="[wandb]", **{"eval.every": 1, "eval.num_prompts": 4})
    run_dir = tmp_path / "runs" / "t"
    done = kd("loop", "--config", str(config), env=OFFLINE)
    assert done.returncode == 0, done.stderr[-3000:]
    (only,) = wandb_records(run_dir)
    logged = {key.split("/")[0] for row in history(only) for key in row if "/" in key}
    assert {"eval", "generate", "score", "score_self_check", "train", "train_epoch", "export-lora"} <= logged, logged
    assert not (run_dir / "tb").exists()


def test_a_wandb_that_cannot_start_is_one_warning_line_and_the_run_goes_on(config_file, tmp_path):
    """Online with an API key but no server (a closed local port): wandb.init fails after its timeout;
    the stage commands say so in one line and write every record to metrics.jsonl all the same."""
    config = config_file(epochs=1, report_to="[wandb]")
    run_dir = tmp_path / "runs" / "t"
    no_server = {"WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "NETRC": str(tmp_path / "no-netrc"),
                 "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "5"}
    for command in ("generate", "score"):
        done = kd(command, "--config", str(config), "--epoch", "0", env=no_server)
        assert done.returncode == 0, done.stderr[-3000:]
        (warning,) = [line for line in done.stderr.splitlines() if "W&B off" in line]
        assert "wandb.project=kd" in warning and "WANDB_API_KEY" in warning and "127.0.0.1:9" in warning, warning
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
    stages = [json.loads(line)["stage"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert stages[0] == "generate" and stages[-1] == "score" and reporters.SELF_CHECK in stages, stages
    assert len((run_dir / "wandb-id").read_text().strip()) == 8  # made by prepare, before any stage ran
