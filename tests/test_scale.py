"""What real-size jobs need of the train step: activation checkpointing, padding-free micro-batches and
no train-time randomness, each equal to the plain padded step to float tolerance (real tiny Qwen3)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kd.stages import objective
from kd.stages.models import disable_dropout, load_causal_lm
from kd.stages.policy import Policy
from kd.stages.train import Collator, micro_batches, pack_rows
from tests.conftest import tiny_config

# (prompt tokens, completion tokens): lengths 8 to 257, as unequal as real prompts and completions.
LENGTHS = [(3, 5), (40, 120), (10, 30), (100, 2), (7, 250), (60, 60)]


def examples(vocabulary: int, seed: int = 0, top_k: int = 0) -> list[dict]:
    """Training examples as kd.stages.train.features makes them, with random tokens and logprobs (and
    with `top_k`, a random teacher top-k at each completion token)."""
    rng = np.random.default_rng(seed)
    rows = []
    for prompt, completion in LENGTHS:
        sampler = -rng.exponential(1.0, completion).astype(np.float32)
        teacher = -rng.exponential(1.0, completion).astype(np.float32)
        rows.append({"input_ids": rng.integers(3, vocabulary, prompt + completion), "prompt_length": prompt,
                     "sampler_logprobs": sampler, "policy_logprobs": sampler, "sampling_policy_logprobs": sampler,
                     "is_weights": np.ones_like(sampler), "raw_is_weights": np.ones_like(sampler), "teacher_logprobs": teacher,
                     "advantages": teacher - sampler})
        if top_k:  # the top-k of a teacher distribution over the vocabulary, so the tail keeps real mass
            logits = rng.normal(0, 3, (completion, vocabulary))
            logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            top_ids = np.argsort(-logprobs, axis=1)[:, :top_k]
            rows[-1]["teacher_top_ids"] = top_ids
            rows[-1]["teacher_top_logprobs"] = np.take_along_axis(logprobs, top_ids, 1).astype(np.float32)
    return rows


@pytest.fixture
def policy(tiny_world, tmp_path):
    """The tiny student with a LoRA whose weights are all non-zero, so that every one gets a gradient."""
    config = tiny_config(tiny_world, tmp_path / "runs", **{"train.gradient_checkpointing": False})
    policy = Policy(config)
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in policy.trainable.values():
            weight.normal_(0, 0.05)
    return policy, config


def step(policy: Policy, config, batch: dict, checkpointing: bool = False) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss and LoRA gradients of one effective batch (its micro-batches or packed rows), in training
    mode as Trainer runs it, and how many times the first decoder layer ran."""
    model = policy.model
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    calls = []
    # A pre-hook: torch's checkpoint stops its recompute once it has what backward needs, before a
    # forward hook at the layer's end would run.
    hook = model.get_decoder().layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    for weight in policy.trainable.values():
        weight.grad = None
    normaliser = batch["shift_labels"].ne(objective.IGNORE).sum()
    loss = 0.0
    try:
        for micro in micro_batches(batch):
            result = objective.step_loss(model, policy.head, micro, config.train, normaliser, 1)
            result.loss.backward()
            loss += result.batch_share
    finally:
        hook.remove()
        model.gradient_checkpointing_disable()
    return loss, {name: weight.grad.clone() for name, weight in policy.trainable.items()}, len(calls)


def assert_same(a: tuple, b: tuple) -> None:
    assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-7)
    for name, grad in a[1].items():
        torch.testing.assert_close(grad, b[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointed_step_equals_the_plain_one_and_recomputes(policy):
    policy, config = policy
    batch = Collator(0)(examples(policy.head.vocabulary))
    plain, checkpointed = step(policy, config, batch), step(policy, config, batch, checkpointing=True)
    assert_same(checkpointed, plain)
    assert any(float(grad.abs().sum()) > 0 for grad in plain[1].values())
    # Checkpointing acts (in training mode): each layer runs again in backward.
    assert (plain[2], checkpointed[2]) == (1, 2)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_equal_the_padded_batch(policy, attention):
    policy, config = policy
    policy.model.set_attn_implementation(attention)
    rows = examples(policy.head.vocabulary)
    padded = Collator(0)(rows)
    packed = Collator(0, micro_batch_tokens=300)(rows)
    packs = packed["packs"]
    assert len(packs) > 1 and all(pack["input_ids"].shape[1] <= 300 for pack in packs)
    assert sum(pack["input_ids"].shape[1] for pack in packs) == sum(p + c for p, c in LENGTHS)  # no padding
    assert_same(step(policy, config, packed), step(policy, config, padded))
    assert_same(step(policy, config, packed, checkpointing=True), step(policy, config, padded))

    # The same rows with positions that do not restart let attention cross sequences: another loss.
    crossing = {**packed, "packs": [{**pack, "position_ids": torch.arange(pack["input_ids"].shape[1])[None]}
                                    for pack in packs]}
    assert step(policy, config, crossing)[0] != pytest.approx(step(policy, config, padded)[0], rel=1e-4)


def test_packed_rows_equal_the_padded_batch_with_the_teachers_top_k(policy, tiny_world, tmp_path):
    """The top-k columns ([tokens, K] per sequence) are placed in packed rows as in the padded batch:
    the top-16 forward KL, which bench/vs_trl.py runs packed, gives the same loss and gradients."""
    policy = policy[0]
    config = tiny_config(tiny_world, tmp_path / "runs", **{"score.top_k": 16, "train.kl_coef": 0.0,
                                                           "train.topk_forward_kl": 1.0})
    rows = examples(policy.head.vocabulary, top_k=16)
    padded, packed = Collator(0, top_k=16)(rows), Collator(0, top_k=16, micro_batch_tokens=300)(rows)
    assert len(packed["packs"]) > 1 and packed["packs"][0]["teacher_top_ids"].shape[-1] == 16
    reference = step(policy, config, padded)
    assert_same(step(policy, config, packed), reference)
    # The top-k columns are what this loss reads: other ones give another loss.
    rng = np.random.default_rng(1)
    other = [{**row, "teacher_top_ids": rng.permutation(row["teacher_top_ids"])} for row in rows]
    assert step(policy, config, Collator(0, top_k=16, micro_batch_tokens=300)(other))[0] != pytest.approx(reference[0], rel=1e-4)


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 9, 3, 7, 2], 10) == [[1], [3, 2], [0, 4]]
    assert pack_rows([30, 4], 10) == [[0], [1]]  # a sequence longer than a row gets its own


def test_training_mode_is_deterministic_with_dropout_configured(tiny_world, tmp_path):
    """A student whose config asks for attention dropout: in training mode two forwards differ until
    disable_dropout, then they are equal (and equal to eval mode)."""
    student = tmp_path / "student"
    shutil.copytree(tiny_world / "student", student)
    settings = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**settings, "attention_dropout": 0.5}))
    model = load_causal_lm(student, "float32", "cpu", attn_implementation="eager")
    ids = torch.arange(3, 40)[None]
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    disable_dropout(model)
    trained = model(input_ids=ids).logits
    assert torch.equal(trained, model(input_ids=ids).logits)
    model.eval()
    torch.testing.assert_close(trained, model(input_ids=ids).logits)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_hf_engines_follow_the_trainers_attention(make_config, attention):
    from kd.stages.session import Session

    config = make_config(**{"train.attn_implementation": attention})
    with Session(config, progress=False) as session:
        student = session.engine("student", config.generate.engine)
        teacher = session.engine("teacher", config.score.engine)
        assert student.base.config._attn_implementation == teacher.base.config._attn_implementation == attention


def test_holding_an_older_adapter_puts_its_weights_in_and_the_trained_ones_back(policy):
    """The trainer's logprobs of the policy that sampled (max_staleness) come from the same model
    with that adapter put in for the block; the weights being trained are back after it."""
    policy, _ = policy
    trained = {name: tensor.clone() for name, tensor in policy.weights().items()}
    with policy.holding(None):
        assert all(torch.equal(tensor, policy.fresh[name]) for name, tensor in policy.weights().items())
    assert all(torch.equal(tensor, trained[name]) for name, tensor in policy.weights().items())
    assert any(not torch.equal(trained[name], policy.fresh[name]) for name in trained)
