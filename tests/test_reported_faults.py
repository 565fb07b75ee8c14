"""Faults that users of other distillers reported (TRL, tinker-cookbook, vLLM, verl, OpenRLHF), each
tried on kd in its several shapes: tempered or nucleus sampling in the advantage, randomness in the
training forward, a teacher's shorter context, and chat rows that end with the answer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kd.stages import datasets_io, evaluate as eval_stage, generate, pipeline, rundir, score, train
from kd.stages.errors import KdError
from kd.stages.schemas import SCORED, TRAIN_STEPS
from kd.stages.session import Session

from tests.test_stages import recomputed_logprobs


def first_epoch(config):
    """generate, score and train epoch 0; the train steps' rows and the scored table."""
    rundir.prepare(config)
    with Session(config, progress=False) as session:
        generate.run(config, 0, session)
        scored = datasets_io.read_table(score.run(config, 0, session), SCORED)
    steps = datasets_io.read_table(train.run(config, 0, progress=False), TRAIN_STEPS).to_pylist()
    return steps, scored


@pytest.mark.parametrize("temperature, top_p", [(0.5, 1.0), (1.0, 0.7), (1.6, 0.9), (1.0, 1.0)])
def test_teacher_equal_to_student_gives_a_noise_sized_step_whatever_the_sampling(make_config, temperature, top_p):
    """The policy distilled is the student at T = 1; tempered / nucleus samples only propose tokens.
    Reported before the fix at T = 0.5: teacher KL 7.8e-3 and a first gradient norm of 3.5e-2."""
    config = make_config(**{"teacher": make_config().student, "generate.temperature": temperature,
                            "generate.top_p": top_p})
    steps, _ = first_epoch(config)
    assert abs(steps[0]["teacher_kl"]) < 1e-5
    assert steps[0]["grad_norm"] < 1e-4, steps[0]


def test_tempered_sampling_uses_the_untempered_student_in_the_advantage(make_config):
    config = make_config(**{"generate.temperature": 0.6, "generate.top_p": 0.9, "train.grad_accum": 1,
                            "train.batch_size": 16, "train.clip_epsilon": 0.2})
    steps, scored = first_epoch(config)
    untempered, behaviour = recomputed_logprobs(config, None, scored)
    teacher = np.concatenate(scored.column("teacher_logprobs").to_numpy(zero_copy_only=False))
    assert abs(steps[0]["teacher_kl"] - float((untempered.numpy() - teacher).mean())) < 1e-5
    # the sampler's processed logprobs are a different distribution's: the test can tell them apart
    assert abs(float((behaviour.numpy() - teacher).mean()) - steps[0]["teacher_kl"]) > 1e-3
    # PPO clips the policy's move since sampling (decoupled from the sampler correction pi_e / mu): at
    # the first step that ratio is 1 and nothing is clipped, whatever the temperature
    assert abs(steps[0]["ratio_mean"] - 1) < 1e-5 and steps[0]["clip_fraction"] == 0


def test_the_models_own_dropout_does_not_act_in_the_training_forward(make_config, tiny_world, tmp_path):
    """A student whose config asks for attention dropout: the first step's importance ratios are 1."""
    student = tmp_path / "dropout-student"
    shutil.copytree(tiny_world / "student", student)
    settings = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**settings, "attention_dropout": 0.3}))
    steps, _ = first_epoch(make_config(student=str(student)))
    assert abs(steps[0]["ratio_max"] - 1) < 1e-4 and abs(steps[0]["ratio_mean"] - 1) < 1e-5, steps[0]


def test_lora_dropout_is_refused_naming_the_field(make_config):
    with pytest.raises(KdError, match="train.lora_dropout: must be 0"):
        make_config(**{"train.lora_dropout": 0.05})


def short_teacher(tiny_world, tmp_path, positions: int):
    teacher = tmp_path / f"teacher-{positions}"
    shutil.copytree(tiny_world / "teacher", teacher)
    settings = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**settings, "max_position_embeddings": positions}))
    return teacher


@pytest.mark.parametrize("stage", ["generate", "eval"])
def test_a_prompt_past_the_teachers_context_is_refused_before_sampling(make_config, tiny_world, tmp_path, stage):
    """The student has 256 positions, this teacher 64: prompt + 60 new tokens fit the one, not the other."""
    teacher = short_teacher(tiny_world, tmp_path, 64)
    config = make_config(**{"teacher": str(teacher), "generate.max_new_tokens": 60, "eval.max_new_tokens": 60})
    rundir.prepare(config)
    with Session(config, progress=False) as session, pytest.raises(KdError) as err:
        (generate if stage == "generate" else eval_stage).run(config, 0, session)
    message = str(err.value)
    assert "teacher" in message and str(teacher) in message and "64" in message and "\n" not in message
    assert not pipeline.stage_dir(config, 0, "rollouts" if stage == "generate" else "eval").exists()


def test_engine_context_limits_count_too(make_config):
    config = make_config(**{"score.engine.max_model_len": 50, "generate.max_new_tokens": 40})
    rundir.prepare(config)
    with Session(config, progress=False) as session, pytest.raises(KdError, match="score.engine.max_model_len"):
        generate.run(config, 0, session)
    config = make_config(**{"run_id": "g", "generate.engine.max_model_len": 50, "generate.max_new_tokens": 40})
    rundir.prepare(config)
    with Session(config, progress=False) as session, pytest.raises(KdError, match="generate.engine.max_model_len"):
        generate.run(config, 0, session)
