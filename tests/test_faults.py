"""Kill anywhere, resume: SIGKILL `kd loop` at every fault point of every stage of epoch 0, re-run
the same command each time, and end with the adapter of an uninterrupted run, bit for bit (the
computation is deterministic on CPU: per-sample seeds, a seeded Trainer, float32)."""

from __future__ import annotations

from pathlib import Path

from kd.stages import config as config_lib, datasets_io, pipeline, verify
from kd.stages.datasets_io import FAULT_POINTS
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
                assert recorded == [(f"{e:04d}", name) for e, name in pipeline.inputs_at(stage, epoch)], (stage, epoch)
