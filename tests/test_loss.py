"""The objective against hand-computed values (tier 1: pure functions)."""

import math

import numpy as np
import pytest
import torch

from kd.stages.loss import advantages, completion_logprobs, group_centred, importance_weights, policy_loss, topk_divergence


def test_advantage_is_negative_reverse_kl_per_token():
    s, q = np.array([-0.5, -1.0, -2.0]), np.array([-1.0, -1.0, -0.5])
    np.testing.assert_allclose(advantages(s, q, kl_coef=2.0), [-1.0, 0.0, 3.0])


def test_advantage_discount_and_reward():
    s, q = np.array([-1.0, -1.0]), np.array([-2.0, -1.5])  # a = [-1, -0.5]
    # the KL part is discounted: [-1 + 0.5 x -0.5, -0.5]; the reward advantage 0.2 is added to every token
    out = advantages(s, q, kl_coef=1.0, gamma=0.5, reward_advantage=0.2)
    np.testing.assert_allclose(out, [-1.25 + 0.2, -0.5 + 0.2], rtol=1e-6)


def test_reward_enters_group_centred():
    # prompt a: rewards 1, 0, 0, 1 (mean 0.5); prompt b: 1, 1 (mean 1: no signal); c: no answer
    rewards = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, None]
    groups = ["a", "a", "b", "a", "a", "b", "c"]
    assert group_centred(rewards, groups, reward_coef=2.0) == [1.0, -1.0, 0.0, -1.0, 1.0, 0.0, 0.0]
    # A_t = reward_coef (R - mean_G R) - kl_coef (s_t - q_t), by hand: s - q = [0.5, -1]
    s, q = np.array([-0.5, -2.0]), np.array([-1.0, -1.0])
    centred = group_centred([1.0, 0.0, 0.0], ["p", "p", "p"], reward_coef=0.3)  # 0.3 x (1 - 1/3) = 0.2
    np.testing.assert_allclose(advantages(s, q, kl_coef=2.0, reward_advantage=centred[0]), [0.2 - 1.0, 0.2 + 2.0],
                               rtol=1e-6)
    np.testing.assert_allclose(centred[1:], [-0.1, -0.1])


def test_zero_advantage_and_loss_when_teacher_equals_student():
    s = np.log(np.array([0.2, 0.5, 0.9]))
    adv = torch.tensor(advantages(s, s, kl_coef=1.0))[None]
    logprobs = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    loss, _ = policy_loss(logprobs[None], torch.tensor(s, dtype=torch.float32)[None], adv, torch.ones(1, 3), 3)
    loss.backward()
    assert loss.item() == 0.0
    assert logprobs.grad is not None and torch.count_nonzero(logprobs.grad) == 0


def test_policy_loss_hand_computed():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    sampler = torch.tensor([[-1.0, -2.5, -0.5]])
    adv = torch.tensor([[0.5, -1.0, 2.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = policy_loss(logprobs, sampler, adv, mask, normaliser=4)
    rho = [1.0, math.exp(0.5)]
    expected = -(rho[0] * 0.5 + rho[1] * -1.0) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dlogp of -rho*A/N is -rho*A/N; the masked token gets none.
    np.testing.assert_allclose(logprobs.grad[0].numpy(), [-rho[0] * 0.5 / 4, rho[1] / 4, 0.0], rtol=1e-6)
    assert stats.tokens == 2 and stats.ratio_max == pytest.approx(rho[1], rel=1e-6)


def test_masked_and_padding_positions_do_not_matter():
    logprobs = torch.tensor([[-1.0, -2.0, -0.3]])
    sampler = torch.tensor([[-1.1, -2.0, -0.3]])
    adv = torch.tensor([[0.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    base, _ = policy_loss(logprobs, sampler, adv, mask, 2)
    changed, _ = policy_loss(
        torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[-1.1, -2.0, 5.0]]), torch.tensor([[0.5, -1.0, 99.0]]), mask, 2
    )
    assert float(base) == float(changed)


def test_gradient_flows_only_through_current_policy_logprob():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    sampler = torch.tensor([[-1.2, -1.9]], requires_grad=True)
    adv = torch.tensor([[0.3, -0.7]], requires_grad=True)
    loss, _ = policy_loss(logprobs, sampler, adv, torch.ones(1, 2), 2)
    loss.backward()
    assert logprobs.grad is not None and sampler.grad is None and adv.grad is None


def test_ppo_clip_and_ratio_cap():
    logprobs = torch.tensor([[0.0, 0.0]], requires_grad=True)
    sampler = torch.tensor([[-1.0, 1.0]])  # rho = [e, 1/e]
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    clipped, stats = policy_loss(logprobs, sampler, adv, mask, 2, clip_epsilon=0.2)
    # token 0: min(e*1, 1.2*1) = 1.2; token 1: min(1/e*-1, 0.8*-1) = -0.8
    assert float(clipped) == pytest.approx(-(1.2 - 0.8) / 2, rel=1e-6)
    assert stats.clipped == 2
    clipped.backward()
    assert torch.count_nonzero(logprobs.grad) == 0  # both tokens clipped: no gradient
    capped, stats = policy_loss(torch.tensor([[0.0, 0.0]]), sampler, adv, mask, 2, ratio_cap=2.0)
    assert float(capped) == pytest.approx(-(2.0 * 1.0 + math.exp(-1) * -1.0) / 2, rel=1e-6)
    assert stats.clipped == 1


class LinearHead:
    """A bias-free linear output head, as kd.stages.models.OutputHead applies a model's."""

    def __init__(self, weight_V_H: torch.Tensor):
        self.weight_V_H, self.vocabulary = weight_V_H, weight_V_H.shape[0]

    def __call__(self, hidden_N_H: torch.Tensor) -> torch.Tensor:
        return hidden_N_H @ self.weight_V_H.T


def gathered(logits_N_V: torch.Tensor, ids_N_K: torch.Tensor) -> torch.Tensor:
    """The trainer's logprobs of ids_N_K, the logits standing in for hidden states of an identity head."""
    return completion_logprobs(logits_N_V, LinearHead(torch.eye(logits_N_V.shape[-1], dtype=logits_N_V.dtype)), ids_N_K)[0]


@pytest.mark.parametrize("chunk_values", [17 * 5, 17 * 100])
def test_completion_logprobs_in_chunks_equal_the_full_computation_and_its_gradient(chunk_values):
    torch.manual_seed(0)
    hidden = torch.randn(23, 8, requires_grad=True)
    weight = torch.randn(17, 8, requires_grad=True)
    targets = torch.randint(0, 17, (23, 3))
    picked, entropy = completion_logprobs(hidden, LinearHead(weight), targets, chunk_values=chunk_values)
    logp = torch.log_softmax(hidden @ weight.T, -1)
    expected = logp.gather(-1, targets)
    torch.testing.assert_close(picked, expected)
    assert entropy == pytest.approx(float(-(logp.exp() * logp).sum()), rel=1e-5)
    upstream = torch.randn(23, 3)
    got = torch.autograd.grad((picked * upstream).sum(), (hidden, weight))
    want = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_completion_logprobs_keep_no_full_vocabulary_tensor_for_backward():
    """Chunked and checkpointed, backward keeps the hidden states, not [N, V] logits."""
    hidden = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(1000, 8)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        completion_logprobs(hidden, LinearHead(weight), torch.zeros(64, 1, dtype=torch.long), chunk_values=1000 * 16)
    assert saved and max(saved) < 64 * 1000
# ---- top-k divergences ------------------------------------------------------------------------

def _top_k_pair(student_probs, teacher_probs, k):
    """Student (via the trainer's float32 gather) and teacher logprobs over the teacher's k most likely tokens."""
    logits = torch.tensor(student_probs, dtype=torch.float64).log()
    teacher = torch.tensor(teacher_probs, dtype=torch.float64).log()
    ids = teacher.topk(k).indices
    return gathered(logits[None], ids[None])[0], teacher[ids]


def test_topk_divergences_match_hand_computed_values():
    # teacher top-2 = tokens 0, 1; buckets P = (0.4, 0.3 | tail 0.3), Q = (0.5, 0.25 | tail 0.25)
    student, teacher = _top_k_pair([0.4, 0.3, 0.2, 0.1], [0.5, 0.25, 0.15, 0.1], 2)
    reverse = 0.4 * math.log(0.4 / 0.5) + 2 * 0.3 * math.log(0.3 / 0.25)
    forward = 0.5 * math.log(0.5 / 0.4) + 2 * 0.25 * math.log(0.25 / 0.3)
    m = tuple(  # beta = 0.25: M = 0.25 Q + 0.75 P
        0.25 * q + 0.75 * p for q, p in zip((0.5, 0.25, 0.25), (0.4, 0.3, 0.3)))
    jsd = 0.25 * sum(q * math.log(q / mi) for q, mi in zip((0.5, 0.25, 0.25), m)) + 0.75 * sum(
        p * math.log(p / mi) for p, mi in zip((0.4, 0.3, 0.3), m)
    )
    assert float(topk_divergence(student, teacher, "reverse_kl")) == pytest.approx(reverse, abs=1e-6)
    assert float(topk_divergence(student, teacher, "forward_kl")) == pytest.approx(forward, abs=1e-6)
    assert float(topk_divergence(student, teacher, "jsd", beta=0.25)) == pytest.approx(jsd, abs=1e-6)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_topk_with_the_whole_vocabulary_is_the_exact_divergence_and_gradient(kind):
    torch.manual_seed(0)
    vocabulary = 50
    logits_N_V = (3 * torch.randn(6, vocabulary)).requires_grad_()
    teacher_N_V = torch.log_softmax(3 * torch.randn(6, vocabulary), -1)
    ids_N_V = teacher_N_V.argsort(-1, descending=True)
    student_top_N_V = gathered(logits_N_V, ids_N_V)
    top_k = topk_divergence(student_top_N_V, teacher_N_V.gather(-1, ids_N_V), kind, beta=0.3).sum()
    (top_k_grad,) = torch.autograd.grad(top_k, logits_N_V)

    log_p, log_q = torch.log_softmax(logits_N_V, -1), teacher_N_V
    if kind == "reverse_kl":
        exact = (log_p.exp() * (log_p - log_q)).sum()
    elif kind == "forward_kl":
        exact = (log_q.exp() * (log_q - log_p)).sum()
    else:
        m = 0.3 * log_q.exp() + 0.7 * log_p.exp()
        exact = 0.3 * (log_q.exp() * (log_q - m.log())).sum() + 0.7 * (log_p.exp() * (log_p - m.log())).sum()
    (exact_grad,) = torch.autograd.grad(exact, logits_N_V)
    assert float(top_k) == pytest.approx(float(exact), abs=1e-4)
    torch.testing.assert_close(top_k_grad, exact_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_tail_bucket_charges_mass_moved_outside_the_support(kind):
    teacher = [0.6, 0.3, 0.05, 0.05]
    same, teacher_top = _top_k_pair(teacher, teacher, 2)
    # Same proportions inside the top-2 as the teacher (a renormalised loss would be 0), half the mass moved out.
    moved, _ = _top_k_pair([0.3, 0.15, 0.275, 0.275], teacher, 2)
    assert abs(float(topk_divergence(same, teacher_top, kind))) < 1e-6  # float32 logits
    assert float(topk_divergence(moved, teacher_top, kind)) > 0.05


def test_decoupled_ppo_clips_the_policys_move_not_the_sampler_correction():
    """With a tempered or stale sampler, rho = (pi_theta / pi_old) (pi_old / mu): PPO clips the first
    factor only, so at the first step (pi_theta = pi_old) nothing is clipped even where pi_old / mu is
    far from 1."""
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    proximal = torch.tensor([[-1.0, -2.0]])  # pi_old: the trainer has not moved yet
    sampler = torch.tensor([[-0.2, -3.5]])  # mu: tempered, far from pi_old
    adv, mask = torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool)
    _, weights = importance_weights(proximal[0].numpy(), sampler[0].numpy(), "none", 2.0)
    loss, stats = policy_loss(logprobs, proximal, adv, mask, 2, clip_epsilon=0.2, is_weights_B_T=torch.from_numpy(weights)[None])
    correction = torch.exp(proximal - sampler)
    assert float(loss) == pytest.approx(float(-(correction * adv).sum() / 2), rel=1e-6)
    assert stats.clipped == 0 and stats.ratio_max == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -(correction * adv) / 2)  # the full importance-weighted gradient


def test_importance_weights_truncated_and_masked_by_hand():
    proximal = np.log(np.array([0.5, 0.5, 0.5, 0.5]))
    sampler = np.log(np.array([0.5, 0.1, 0.9, 0.3]))  # w = 1, 5, 0.5556, 1.6667
    raw, none = importance_weights(proximal, sampler, "none", 2.0)
    np.testing.assert_allclose(raw, [1, 5, 5 / 9, 5 / 3], rtol=1e-6)
    np.testing.assert_array_equal(none, raw)
    _, tis = importance_weights(proximal, sampler, "tis", 2.0)
    np.testing.assert_allclose(tis, [1, 2, 5 / 9, 5 / 3], rtol=1e-6)  # min(w, C): the small weight stays
    _, mis = importance_weights(proximal, sampler, "mis", 1.7)
    np.testing.assert_allclose(mis, [1, 0, 0, 5 / 3], rtol=1e-6)  # outside [1/C, C]: dropped
    # geometric mean of the weights: exp(mean log w) = (1 * 5 * 5/9 * 5/3)^(1/4) = 1.47 -> kept under C = 1.7 ...
    _, kept = importance_weights(proximal, sampler, "mis", 1.7, "geometric")
    np.testing.assert_allclose(kept, raw, rtol=1e-6)
    _, dropped = importance_weights(proximal, sampler, "mis", 1.4, "geometric")  # ... and dropped under 1.4
    assert not dropped.any()


def test_truncated_weights_keep_the_gradient_and_masked_tokens_lose_it():
    """TIS scales a token's gradient by min(w, C); MIS zeroes it: rho = r w with w data, r = 1 at step 1."""
    logprobs = torch.tensor([[-0.7, -0.7]], requires_grad=True)
    proximal = logprobs.detach().clone()
    adv = torch.tensor([[1.0, 1.0]])
    for weights, expected in (([2.0, 0.5], [-2.0 / 2, -0.5 / 2]), ([0.0, 1.0], [0.0, -1.0 / 2])):
        logprobs.grad = None
        loss, _ = policy_loss(logprobs, proximal, adv, torch.ones(1, 2), 2, is_weights_B_T=torch.tensor([weights]))
        loss.backward()
        np.testing.assert_allclose(logprobs.grad[0].numpy(), expected, rtol=1e-6)
