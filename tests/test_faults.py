"""Kill anywhere, resume: SIGKILL `kd loop` at every fault point of every stage of epoch 0, re-run
the same command each time, and end with the adapter of an uninterrupted run, bit for bit (the
computation is deterministic on CPU: per-sample seeds, a seeded Trainer, float32)."""

from __future__ import annotations

from pathlib import Path

from kd.stages import config as config_lib, datasets_io, pipeline, verify
from kd.stages.datasets_io import FAULT_POINTS
from kd.stages.schemas import ROLLOUTS, SCORED
from tests.test_loop import kd

STAGES = tuple(stage.output for stage in pipeline.STAGES)  # eval, rollouts, scored, train, adapter


def kill_points() -> list[str]:
    points = []
    for stage in STAGES:
        points += [f"0000/{stage}:{point}" for point in FAULT_POINTS]
        if stage == "train":
            points.insert(len(points) - 2, "0000/train:checkpoint")  # after files, before manifest
    return points + ["0001/scored:manifest", "0002/eval:staged"]


def test_every_kill_point_resumes_to_the_uninterrupted_result(config_file, tmp_path):
    overrides = {"eval.every": 2, "eval.num_prompts": 8}
    reference = config_file(run_id="reference", epochs=2, **overrides)
    assert kd("loop", "--config", str(reference)).returncode == 0
    config = config_file(run_id="killed", epochs=2, **overrides)
    survived = 0
    for point in kill_points():
        killed = kd("loop", "--config", str(config), env={"KD_FAULT_KILL": point})
        assert killed.returncode == -9, (point, killed.stderr[-2000:])
        survived += 1
    finished = kd("loop", "--config", str(config))
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert survived == len(kill_points()) == 23

    runs = tmp_path / "runs"
    report = verify.run(runs / "killed")
    assert report["datasets"] and not any(report["datasets"].values()), report
    for epoch in ("0000", "0001"):
        ours = (runs / "killed" / epoch / "adapter" / "adapter_model.safetensors").read_bytes()
        theirs = (runs / "reference" / epoch / "adapter" / "adapter_model.safetensors").read_bytes()
        assert ours == theirs, epoch
    assert not list(runs.glob("killed/*/.*.tmp-*"))  # the next writer removed what dead ones staged
    killed_config = config_lib.load(config)
    for stage in pipeline.STAGES:  # what each dataset recorded reading is what the pipeline table declares
        for epoch in range(3):
            manifest = datasets_io.read_manifest(pipeline.stage_dir(killed_config, epoch, stage.output))
            if manifest is not None:
                recorded = [Path(i["path"]).parts[-2:] for i in manifest["inputs"]]
                assert recorded == [(f"{e:04d}", name) for e, name in pipeline.inputs_at(stage, epoch, killed_config.max_staleness)], (stage, epoch)


# The overlapped loop (max_staleness 1): while epoch e trains on the training side, the sampling side
# (its own process) generates and scores epoch e+1. Kill each side anywhere: the training side in
# epoch 0, the sampling side in epoch 2 (which samples with epoch 0's adapter while epoch 1 trains).
# Each point is reached only while its dataset is incomplete, whatever the other side did meanwhile.
OVERLAP_POINTS = [f"{epoch}/{stage}:{point}" for epoch, stage in (("0000", "train"), ("0000", "adapter"),
                                                                    ("0002", "rollouts"), ("0002", "scored"))
                  for point in FAULT_POINTS]
OVERLAP_POINTS.insert(2, "0000/train:checkpoint")
SAMPLING_SIDE = ("rollouts", "scored")


def test_every_kill_point_of_the_overlapped_loop_resumes_to_the_stage_commands_one_by_one(config_file, tmp_path):
    """The overlapped loop, killed at each point of either side and re-run, ends with the datasets and
    adapters that the stage commands write one by one with the same config: results do not depend on
    which side ran when."""
    overrides = {"eval.every": 2, "eval.num_prompts": 8, "max_staleness": 1,
                 "overlap.sampler_threads": 1, "overlap.trainer_threads": 1}
    reference = config_file(run_id="one-by-one", epochs=3, **overrides)
    for epoch in range(4):
        for stage in pipeline.STAGES:
            if pipeline.runs_at(stage, epoch, config_lib.load(reference)):
                done = kd(stage.command, "--config", str(reference), "--epoch", str(epoch))
                assert done.returncode == 0, (stage.command, epoch, done.stderr[-2000:])
    config = config_file(run_id="killed", epochs=3, **overrides)
    for point in OVERLAP_POINTS:
        killed = kd("loop", "--config", str(config), env={"KD_FAULT_KILL": point})
        if point.split("/")[1].split(":")[0] in SAMPLING_SIDE:  # the worker died; the loop says so and stops
            assert killed.returncode == 2 and "the sampling side died" in killed.stderr, (point, killed.stderr[-2000:])
        else:
            assert killed.returncode == -9, (point, killed.stderr[-2000:])
    finished = kd("loop", "--config", str(config))
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "overlapped loop (max_staleness 1)" in finished.stdout + finished.stderr
    assert len(kill_points()) + len(OVERLAP_POINTS) >= 40

    runs = tmp_path / "runs"
    report = verify.run(runs / "killed")
    assert report["datasets"] and not any(report["datasets"].values()), report
    assert not list(runs.glob("killed/*/.*.tmp-*"))
    killed_config = config_lib.load(config)
    for epoch in ("0000", "0001", "0002"):
        ours = (runs / "killed" / epoch / "adapter" / "adapter_model.safetensors").read_bytes()
        theirs = (runs / "one-by-one" / epoch / "adapter" / "adapter_model.safetensors").read_bytes()
        assert ours == theirs, epoch
        for kind in (ROLLOUTS, SCORED):
            assert datasets_io.read_table(runs / "killed" / epoch / kind.name, kind).equals(
                datasets_io.read_table(runs / "one-by-one" / epoch / kind.name, kind)), (epoch, kind.name)
    # Epochs 0 and 1 sampled with the base student, epoch 2 with epoch 0's adapter: as the table says.
    versions = [datasets_io.read_table(runs / "killed" / f"{e:04d}" / "rollouts", ROLLOUTS).column("policy_version")[0].as_py()
                for e in range(3)]
    assert versions == [0, 0, 1]
    for stage in pipeline.STAGES:
        for epoch in range(4):
            manifest = datasets_io.read_manifest(pipeline.stage_dir(killed_config, epoch, stage.output))
            if manifest is not None:
                recorded = [Path(i["path"]).parts[-2:] for i in manifest["inputs"]]
                assert recorded == [(f"{e:04d}", name) for e, name in pipeline.inputs_at(stage, epoch, 1)], (stage, epoch)
