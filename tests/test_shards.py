"""Sharded generate and score: the shards' union is the unsharded dataset; missing shards are refused
by name; a killed shard leaves no part; a finished shard's task re-run does nothing."""

from __future__ import annotations

import pyarrow as pa
import pytest

from kd.stages import datasets_io, generate, pipeline, rundir, score, shards, verify
from kd.stages.errors import KdError
from kd.stages.schemas import ROLLOUTS, SCORED
from kd.stages.session import Session
from tests.test_loop import kd


def test_shard_blocks_partition_the_rows():
    for count in (0, 1, 5, 16, 17):
        for num_shards in (1, 2, 3, 7):
            covered = [i for s in range(num_shards) for i in range(count)[shards.block(count, s, num_shards)]]
            assert covered == list(range(count))


def test_shard_defaults_come_from_the_slurm_array(monkeypatch):
    assert shards.from_env(None, None) == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert shards.from_env(None, None) == (1, 3)
    assert shards.from_env(2, None) == (2, 3)
    with pytest.raises(KdError, match="--shard 3: must be in 0..2"):
        shards.from_env(3, None)


def rows_of(table: pa.Table) -> list[tuple]:
    return list(zip(table.column("prompt_id").to_pylist(), table.column("sample_index").to_pylist()))


def test_sharded_union_is_the_unsharded_dataset(make_config):
    whole = make_config(run_id="whole")
    split = make_config(run_id="split")
    with Session(whole, progress=False) as session:
        rundir.prepare(whole)
        generate.run(whole, 0, session)
        score.run(whole, 0, session)
        rundir.prepare(split)
        for shard in (2, 0):
            generate.run(split, 0, session, shard=shard, num_shards=3)
        rollouts = pipeline.stage_dir(split, 0, "rollouts")
        with pytest.raises(KdError, match=r"1 of 3 shards missing \(1\).*--shard 1 --num-shards 3"):
            datasets_io.read_table(rollouts, ROLLOUTS)
        with pytest.raises(KdError, match="shards missing"):
            score.run(split, 0, session, shard=0, num_shards=2)
        generate.run(split, 0, session, shard=1, num_shards=3)
        for shard in range(2):
            score.run(split, 0, session, shard=shard, num_shards=2)

    for stage, kind in (("rollouts", ROLLOUTS), ("scored", SCORED)):
        ours = datasets_io.read_table(pipeline.stage_dir(split, 0, stage), kind)
        theirs = datasets_io.read_table(pipeline.stage_dir(whole, 0, stage), kind)
        assert rows_of(ours) == rows_of(theirs) and len(set(rows_of(ours))) == ours.num_rows == 16
        # Per-sample seeds: the same tokens, whichever shard (and batch) a sample was drawn in.
        assert ours.column("completion_token_ids").to_pylist() == theirs.column("completion_token_ids").to_pylist()
        for column in ("sampler_logprobs", "teacher_logprobs")[: 1 if stage == "rollouts" else 2]:
            for a, b in zip(ours.column(column).to_pylist(), theirs.column(column).to_pylist()):
                assert a == pytest.approx(b, abs=1e-4)
    scored = datasets_io.read_manifest(pipeline.stage_dir(split, 0, "scored"))
    whole_scored = datasets_io.read_manifest(pipeline.stage_dir(whole, 0, "scored"))
    assert scored["stats"]["shards"] == 2 and len(scored["stats"]["shard_wall_seconds"]) == 2
    assert scored["stats"]["teacher_kl"] == pytest.approx(whole_scored["stats"]["teacher_kl"], abs=1e-4)
    report = verify.run(split.run_dir)
    assert len(report["datasets"]) == 2 and not any(report["datasets"].values()), report


def test_killed_shard_leaves_no_part_and_its_rerun_completes(config_file, tmp_path):
    config = str(config_file(run_id="array"))
    rollouts = tmp_path / "runs" / "array" / "0000" / "rollouts"
    array = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0"}
    first = kd("generate", "--config", config, "--epoch", "0", env={**array, "SLURM_ARRAY_TASK_ID": "0"})
    assert first.returncode == 0, first.stderr[-2000:]
    killed = kd("generate", "--config", config, "--epoch", "0",
                env={**array, "SLURM_ARRAY_TASK_ID": "1", "KD_FAULT_KILL": "0000/rollouts:shard-1:files"})
    assert killed.returncode == -9
    assert sorted(p.name for p in rollouts.glob("*.arrow")) == ["part-00000-of-00002.arrow"]
    assert not (rollouts / datasets_io.MANIFEST).exists()
    refused = kd("inspect", str(rollouts))
    assert refused.returncode == 2 and "1 of 2 shards missing (1)" in refused.stderr

    marker = rollouts / "_shards" / "00000-of-00002.json"
    written = marker.stat().st_mtime_ns
    again = kd("generate", "--config", config, "--epoch", "0", "--shard", "0", "--num-shards", "2")
    assert again.returncode == 0 and marker.stat().st_mtime_ns == written  # a finished shard is not redone
    last = kd("generate", "--config", config, "--epoch", "0", env={**array, "SLURM_ARRAY_TASK_ID": "1"})
    assert last.returncode == 0, last.stderr[-2000:]
    assert datasets_io.read_manifest(rollouts)["rows"] == 16
    assert not list(rollouts.glob(".*.tmp-*"))  # the killed writer's partial part was removed
    status = kd("status", str(tmp_path / "runs" / "array"))
    assert status.returncode == 0 and "done (2 shards)" in status.stdout, status.stderr
