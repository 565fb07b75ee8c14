"""Several teachers: prompts routed by a field (score.route_by) to teachers with their own model and
kl_weight; each teacher writes its own shards (`kd score --teacher`); status and inspect show the split.

The second teacher here is the tiny world's student itself ("echo"): at epoch 0 the policy is that
model, so the rows it scores must get teacher logprobs equal to their sampler logprobs, and the
default teacher's rows must not.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from kd.stages import datasets_io, generate, pipeline, rundir, score, shards, slurm, status
from kd.stages.errors import KdError
from kd.stages.schemas import ROLLOUTS, SCORED
from kd.stages.session import Session
from kd.stages.train import features

from tests.conftest import routed_prompts
from tests.test_loop import kd


@pytest.fixture
def routed(tiny_world, tmp_path):
    """The tiny world's train prompts, every third one with domain: echo; returns (file, {id: teacher})."""
    path = tmp_path / "routed.jsonl.zst"
    return path, routed_prompts(tiny_world, path)


def generated(config):
    """`config`'s run with epoch 0 generated, and the session that did it (to go on with)."""
    rundir.prepare(config)
    session = Session(config, progress=False)
    generate.run(config, 0, session)
    return session


def two_teachers(make_config, tiny_world, prompts, **overrides):
    student = tiny_world / "student"
    return make_config(**{
        "generate.prompts": str(prompts), "generate.prompts_per_epoch": 12, "score.route_by": "domain",
        "score.teachers": f"{{echo: {{model: {student}, engine: {{device: cpu, dtype: float32}}, kl_weight: 0.5}}}}",
        **overrides,
    })


def test_each_row_is_scored_by_its_teacher_and_the_union_is_every_prompt(make_config, tiny_world, routed, capsys):
    prompts, teacher_of = routed
    config = two_teachers(make_config, tiny_world, prompts)
    with generated(config) as session:
        out = score.run(config, 0, session)
    rollouts = datasets_io.read_table(pipeline.stage_dir(config, 0, "rollouts"), ROLLOUTS)
    table = datasets_io.read_table(out, SCORED)
    assert sorted(zip(table.column("prompt_id").to_pylist(), table.column("sample_index").to_pylist())) == sorted(
        zip(rollouts.column("prompt_id").to_pylist(), rollouts.column("sample_index").to_pylist()))
    names = table.column("teacher").to_pylist()
    assert names == [teacher_of[p] for p in table.column("prompt_id").to_pylist()]
    assert {"default", "echo"} == set(names)
    for name, sampler, teacher in zip(names, table.column("sampler_logprobs").to_pylist(),
                                      table.column("teacher_logprobs").to_pylist()):
        gap = np.abs(np.subtract(sampler, teacher)).mean()
        assert gap < 1e-4 if name == "echo" else gap > 1e-2, (name, gap)

    stats = datasets_io.read_manifest(out)["stats"]
    assert stats["shards"] == 2  # one per teacher
    assert {name: split["rows"] for name, split in stats["teachers"].items()} == {
        name: names.count(name) for name in ("default", "echo")}
    assert abs(stats["teachers"]["echo"]["teacher_kl"]) < 1e-4 < stats["teachers"]["default"]["teacher_kl"]
    rows = status.run(config.run_dir)
    assert rows[0]["score"] == f"done (2 shards; default {names.count('default')}, echo {names.count('echo')})"

    examples = features(table, config.train, out, kl_weights={n: t.kl_weight for n, t in config.teachers.items()})
    assert [e["kl_coef"] for e in examples] == [0.5 if n == "echo" else 1.0 for n in names]
    from kd.stages import inspection

    summary = inspection.run(out)
    assert set(summary["teachers"]) == {"default", "echo"}


def test_a_teacher_scores_its_own_shards_from_the_command_line(make_config, tiny_world, routed, tmp_path):
    prompts, _ = routed
    config = two_teachers(make_config, tiny_world, prompts)
    generated(config).close()
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    out = pipeline.stage_dir(config, 0, "scored")

    only = kd("score", "--config", str(path), "--epoch", "0", "--teacher", "echo", "--num-shards", "2", "--shard", "1")
    assert only.returncode == 0, only.stderr[-2000:]
    assert not datasets_io.is_complete(out)
    assert status.run(config.run_dir)[0]["score"] == "1/4 shards"  # 2 teachers x 2 shards; echo's shard 1 = 3
    assert sorted(datasets_io.read_markers(out, 4)) == [3]
    wrong = kd("score", "--config", str(path), "--epoch", "0", "--teacher", "other")
    assert wrong.returncode != 0 and "--teacher other: this run has no such teacher; its teachers are default, echo" in wrong.stderr
    for teacher, shard in (("echo", 0), ("default", 0), ("default", 1)):
        done = kd("score", "--config", str(path), "--epoch", "0", "--teacher", teacher, "--num-shards", "2",
                  "--shard", str(shard))
        assert done.returncode == 0, done.stderr[-2000:]
    assert datasets_io.is_complete(out)

    alone = two_teachers(make_config, tiny_world, prompts, run_id="alone")
    with generated(alone) as session:
        reference = datasets_io.read_table(score.run(alone, 0, session), SCORED)
    sharded = datasets_io.read_table(out, SCORED)

    def rows(table):
        return sorted(zip(table.column("prompt_id").to_pylist(), table.column("sample_index").to_pylist(),
                          table.column("teacher").to_pylist(), table.column("teacher_logprobs").to_pylist()))

    assert [row[:3] for row in rows(sharded)] == [row[:3] for row in rows(reference)]
    for ours, theirs in zip(rows(sharded), rows(reference)):  # other batches, so float rounding may differ
        np.testing.assert_allclose(ours[3], theirs[3], atol=1e-4)


def test_slurm_submits_one_score_array_per_teacher(make_config, tiny_world, routed):
    prompts, _ = routed
    config = two_teachers(make_config, tiny_world, prompts, epochs=1, **{"slurm.score.tasks": 2})
    jobs = {job.key: job for job in slurm.plan(config)}
    assert [key for key in jobs if key.startswith("0-")] == ["0-eval", "0-generate", "0-score-default", "0-score-echo",
                                                            "0-train", "0-export-lora"]
    assert jobs["0-train"].after == ["0-score-default", "0-score-echo"]
    assert "--teacher echo --shard $SLURM_ARRAY_TASK_ID --num-shards 2" in jobs["0-score-echo"].script
    assert jobs["0-score-echo"].array == "0,1" and jobs["0-score-echo"].name == "kd-t-0000-score-echo"

    # echo's shard 1 done (the dataset's shard 3 of 4): only the rest is submitted again
    out = pipeline.stage_dir(config, 0, "scored")
    shards.write_part(out, SCORED, SCORED.schema.empty_table(), 3, 4, 0.0)
    jobs = {job.key: job for job in slurm.plan(config)}
    assert jobs["0-score-echo"].array == "0" and jobs["0-score-default"].array == "0,1"


def test_a_prompt_naming_no_teacher_is_refused(make_config, tiny_world, tmp_path):
    rows = datasets_io.read_prompt_rows(tiny_world / "prompts" / "train.jsonl.zst")
    rows[4]["domain"] = "ehco"
    path = tmp_path / "typo.jsonl.zst"
    datasets_io.write_jsonl_zst(path, rows)
    config = two_teachers(make_config, tiny_world, path)
    rundir.prepare(config)
    with Session(config, progress=False) as session, pytest.raises(KdError) as refused:
        generate.run(config, 0, session)
    assert str(refused.value) == f"{path}:5: field domain: 'ehco' names no teacher; score.teachers has echo (drop the field for the default teacher)"
    assert not pipeline.stage_dir(config, 0, "rollouts").exists()


def test_self_check_compares_a_replica_and_stops_on_disagreement(make_config):
    """The tiny teacher against a bfloat16 replica of itself: a mean |q - q'| of about 1e-4 on this
    confident toy model, caught at a tolerance of 1e-5; a float32 replica agrees to float rounding."""
    bf16 = make_config(**{"score.replica": "{kind: hf, device: cpu, dtype: bfloat16}", "score.self_check_tolerance": 1e-5})
    with generated(bf16) as session:
        with pytest.raises(KdError, match=r"^score epoch 0: teacher default disagrees with its replica \(score.replica\): "
                                          r"mean \|q - q'\| [\d.e-]+ per token \(max [\d.e-]+\) over \d+ tokens of 2 "
                                          r"sequences, above score.self_check_tolerance 1e-05; check that both serve"):
            score.run(bf16, 0, session)
    assert not pipeline.stage_dir(bf16, 0, "scored").exists()
    (stopped,) = [r for r in rundir.read_metrics(bf16.run_dir) if r["stage"] == "score_self_check"]
    assert stopped["mean_abs_diff"] > 1e-5  # the numbers of the check that stopped the stage are kept

    # Raising the tolerance is no other run: the self-check is not part of the fingerprint.
    looser = make_config(**{"score.replica": "{kind: hf, device: cpu, dtype: float32}", "score.self_check_tolerance": 1e-5})
    assert looser.fingerprint() == bf16.fingerprint()
    rundir.prepare(looser)
    with Session(looser, progress=False) as session:
        assert datasets_io.is_complete(score.run(looser, 0, session))
    check = [r for r in rundir.read_metrics(looser.run_dir) if r["stage"] == "score_self_check"][-1]
    assert (check["against"], check["sequences"]) == ("replica", 2) and check["mean_abs_diff"] < 1e-6  # batch rounding


def test_a_routing_field_that_no_prompt_has_is_warned_about(make_config, tiny_world, routed, capsys):
    prompts, _ = routed
    config = two_teachers(make_config, tiny_world, prompts, **{"score.route_by": "domian"})
    generated(config).close()
    assert f"kd: warning: {prompts}: no row has the field 'domian' (score.route_by)" in capsys.readouterr().err
    table = datasets_io.read_table(pipeline.stage_dir(config, 0, "rollouts"), ROLLOUTS)
    assert set(table.column("teacher").to_pylist()) == {"default"}
