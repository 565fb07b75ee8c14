"""The on-policy distillation objective (Thinking Machines / Tinker cookbook formulation).

Per completion token t of a sample y drawn by the sampler mu from the policy pi_e of epoch e
(mu = pi_e at temperature 1 and top_p 1, the default; see "Sampling at T != 1" below):
    s_t   = log mu(y_t | x, y_<t)              behaviour logprob, recorded by generate
    p_t   = log pi_e(y_t | x, y_<t)            the policy's own T = 1 logprob, recomputed by the trainer
                                               (o_t below; = s_t at T = 1 up to numerical mismatch)
    q_t   = log p_teacher(y_t | x, y_<t)       teacher logprob, recorded by score
    a_t   = -kl_coef w (p_t - q_t)             negative per-token reverse KL estimate (w: the kl_weight of
                                               the teacher that scored y, score.teachers; 1 by default)
    R     = the task verifier's reward of y    (score's `reward` column, kd.stages.tasks; in [0, 1])
    A_t   = sum_{k >= t} gamma^(k-t) a_k + reward_coef (R - mean_G R)
            gamma = 0 (default): the KL part is a_t. The task reward enters group-centred, as in GRPO
            (Shao et al. 2024, arXiv:2402.03300; without its division by the group's std, as Dr. GRPO,
            Liu et al. 2025, arXiv:2503.20783): mean_G is over the G samples of y's prompt in the epoch,
            and every token of y gets the same reward advantage. A prompt without an answer, or whose
            G samples all score alike (or G = 1), contributes no reward signal.
A_t is data: no gradient flows through it.

Loss over the tokens of an optimiser step (prompt and padding masked out):
    o_t   = log pi_old(y_t | x, y_<t)          the trainer's own T = 1 logprob of the policy it holds
                                               when the epoch starts, recomputed before its first step
    r_t   = exp(log pi_theta(y_t) - o_t)       the policy's move since the epoch started (1 at step 1)
    w_t   = C(exp(o_t - s_t))                  the off-policy weight of the sampler, corrected
    rho_t = r_t w_t                            importance ratio against the sampler
    L     = -sum_t rho_t A_t / N,  N = completion tokens of the whole effective batch
Its gradient is -sum_t rho_t A_t grad log pi_theta(y_t) / N: the importance-weighted policy
gradient. pi_old / mu holds everything between the sampler and the trainer: the sampler's
temperature and top-p, its numerical mismatch with the trainer (another engine, another precision),
and its staleness (max_staleness s: the sampler was the adapter of epoch e-1-s, pi_old that of
e-1). C (train.is_correction, `importance_weights`): none, truncated IS min(w, threshold), or masked
IS (tokens or sequences outside [1/threshold, threshold] dropped). With s = 0, T = 1 and the same
engine, w_t = 1 up to numerical mismatch (the training forward runs with every dropout off, so it is
the sampler's deterministic policy). Options on r:
    clip_epsilon > 0: PPO on r, -min(rho A, clip(r, 1-eps, 1+eps) w A) (decoupled PPO)
    ratio_cap > 0:    rho replaced by min(rho, cap) (no gradient where capped)
The reported ratio statistics (ratio_mean, ratio_max, train.max_ratio's abort) are of r; the
weights' quantiles, the share of tokens the correction changed and |s_t - b_t|, b_t the trainer's
logprob of the very policy that sampled (the sampler's mismatch, free of staleness), are logged
per step (kd.stages.train).

Top-k divergences (score.top_k = K > 0; train.topk_reverse_kl / topk_forward_kl / topk_jsd > 0).
At each completion position t the scored data holds the teacher's K most likely tokens S_t and
their logprobs q_k. Both distributions are collapsed onto K + 1 buckets: the K tokens of S_t and a
tail bucket for everything else,
    Q = (exp q_1, ..., exp q_K, 1 - sum_k exp q_k)
    P = (exp p_1, ..., exp p_K, 1 - sum_k exp p_k),   p_k = log pi_theta(k | x, y_<t), k in S_t
and the divergence is taken between P and Q over those buckets (tail masses below TAIL_FLOOR are
raised to it, to keep the logarithms finite):
    reverse KL   D = sum_b P_b (log P_b - log Q_b)
    forward KL   D = sum_b Q_b (log Q_b - log P_b)
    JSD(beta)    M = beta Q + (1 - beta) P,  D = beta KL(Q || M) + (1 - beta) KL(P || M)
                 (TRL's generalised JSD; beta -> 1 approaches reverse KL's shape, beta -> 0 forward's)
The tail bucket is what keeps the student honest: without it, moving mass off S_t would lower
every p_k's share of nothing and leave the loss unchanged; with it, mass outside S_t is compared
with the teacher's own (small) tail. With K = the vocabulary the tail is empty and D is the exact
divergence (its gradient too). Loss = sum over completion positions of coef x D / N, N as above;
no importance ratio: D is a function of the student's whole distribution at a position the sampler
reached, and GKD / TRL weight those positions equally too.

Which student logprobs are needed: only p_k for k in S_t, i.e. gather(logits, ids) - logsumexp
(logits), [N, K] values at the N completion positions. The logsumexp over the vocabulary is the one
the sampled-token term already computes, so the top-k terms add an [N, K] gather.

No [B, T, V] logits tensor exists at any point (`completion_logprobs`): the model returns its final
hidden states, only the N completion positions are kept, and the output head is applied a chunk of
rows at a time (HEAD_CHUNK_VALUES logits), each chunk recomputed in backward (activation
checkpointing) instead of kept. Peak memory for the head is then a few chunks, whatever the
vocabulary and the completion length; prompt positions never reach the head. The same idea as TRL's
`DistillationTrainer` (`_chunked_divergence_loss`) and Liger's fused linear cross-entropy.

Sampling at temperature T != 1 or top_p < 1 (the reported fault: with s_t in the advantage, the
objective's minimum moved away from the teacher). The sampler mu (tempered, nucleus-renormalised)
only proposes tokens; the policy distilled is the student at T = 1, pi, whose reverse KL to the
teacher is the objective. So the advantage uses p_t = log pi_e(y_t), which `kd train` recomputes
before its first step, and the ratio divides by s_t: E_mu[rho A grad log pi] is then the gradient
of KL(pi || teacher) over the tokens mu can draw (top_p < 1 leaves the tokens outside the nucleus
unsampled, so there the estimate is biased, as any nucleus sampler's is), and a teacher equal to
the student gives a zero step whatever T and top_p (tested). The train stage's `teacher_kl` metric
is mean(p_t - q_t) over the samples; score's is mean(s_t - q_t), the same number at T = 1.
RL trainers instead divide the trainer's logits by the sampling temperature (TRL's GRPOTrainer,
trl/trainer/grpo_trainer.py; verl's actor, verl/workers/actor/dp_actor.py): they train the tempered
policy. Against a teacher at T = 1 that moves the minimum: the tempered student would match the
teacher and the T = 1 student not; kd keeps the T = 1 policy as the one distilled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kd.stages.models import HEAD_CHUNK_VALUES


def advantages(
    policy_logprobs: np.ndarray,
    teacher_logprobs: np.ndarray,
    kl_coef: float,
    gamma: float = 0.0,
    reward_advantage: float = 0.0,
) -> np.ndarray:
    """A_t for one sample (float32, one value per completion token): the discounted negative reverse
    KL estimate plus the sample's `reward_advantage`, reward_coef (R - mean_G R) (`group_centred`)."""
    per_token = -kl_coef * (np.asarray(policy_logprobs, np.float64) - np.asarray(teacher_logprobs, np.float64))
    if gamma != 0.0:
        running = 0.0
        for t in range(len(per_token) - 1, -1, -1):
            running = per_token[t] + gamma * running
            per_token[t] = running
    return (per_token + reward_advantage).astype(np.float32)


def group_centred(rewards: list[float | None], groups: list[str], reward_coef: float) -> list[float]:
    """reward_coef (R_i - mean of R over the samples of i's group), per sample: `groups` are the
    samples' prompt ids; a sample without a reward (None: no answer) gets 0 and is not in the mean."""
    sums: dict[str, list[float]] = {}
    for reward, group in zip(rewards, groups):
        if reward is not None:
            sums.setdefault(group, []).append(reward)
    return [0.0 if reward is None else reward_coef * (reward - float(np.mean(sums[group])))
            for reward, group in zip(rewards, groups)]


def completion_logprobs(hidden_N_H: torch.Tensor, head, targets_N_K: torch.Tensor,
                        chunk_values: int = HEAD_CHUNK_VALUES) -> tuple[torch.Tensor, float]:
    """log softmax(head(h))[targets] at N positions, [N, K], and the sum of the N positions' entropies.

    `hidden_N_H`: the model's final hidden states at the positions wanted (completion positions only);
    `head`: hidden [C, H] -> logits [C, V] (kd.stages.models.OutputHead). The head runs on chunks
    of rows holding at most `chunk_values` logits; with gradients on, each chunk is recomputed in
    backward rather than kept, so no [N, V] tensor outlives its chunk.
    """
    from torch.utils.checkpoint import checkpoint

    rows = max(1, chunk_values // head.vocabulary)
    pieces, entropies = [], []
    for start in range(0, hidden_N_H.shape[0], rows):
        measured: list[torch.Tensor] = []  # backward's recomputation of the chunk needs no metric: taken once

        def chunk(hidden_C_H: torch.Tensor, targets_C_K: torch.Tensor, measured=measured) -> torch.Tensor:
            logits_C_V = head(hidden_C_H).float()
            lse_C_1 = torch.logsumexp(logits_C_V, -1, keepdim=True)
            if not measured:
                with torch.no_grad():
                    logp_C_V = logits_C_V - lse_C_1
                    measured.append(-(logp_C_V.exp() * logp_C_V).sum())
            return logits_C_V.gather(-1, targets_C_K) - lse_C_1

        piece = (hidden_N_H[start : start + rows], targets_N_K[start : start + rows])
        if torch.is_grad_enabled() and hidden_N_H.requires_grad:
            pieces.append(checkpoint(chunk, *piece, use_reentrant=False))
        else:
            pieces.append(chunk(*piece))
        entropies.append(measured[0])
    if not pieces:
        return hidden_N_H.new_zeros((0, targets_N_K.shape[-1]), dtype=torch.float32), 0.0
    return torch.cat(pieces), float(torch.stack(entropies).sum())  # one device sync, not one per chunk


TAIL_FLOOR = 1e-6  # above float32 rounding of a sum of K probabilities, so K = vocabulary gives an empty tail


def with_tail(top_logprobs_N_K: torch.Tensor) -> torch.Tensor:
    """[..., K] logprobs of K tokens -> [..., K + 1] with log(1 - their mass) appended as the tail bucket."""
    inside_N = torch.logsumexp(top_logprobs_N_K, -1).clamp(max=math.log1p(-TAIL_FLOOR))
    tail_N = torch.log(-torch.expm1(inside_N))
    return torch.cat([top_logprobs_N_K, tail_N[..., None]], -1)


def topk_divergence(student_N_K: torch.Tensor, teacher_N_K: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between student and teacher over the teacher's top-K plus a tail bucket.

    Both arguments are logprobs of the same K tokens (the teacher's top-K) at each position;
    `kind` is reverse_kl, forward_kl or jsd. See the module docstring.
    """
    log_p, log_q = with_tail(student_N_K), with_tail(teacher_N_K.detach())
    if kind == "reverse_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "forward_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_q + math.log(beta), log_p + math.log1p(-beta)]), 0)
        return beta * (log_q.exp() * (log_q - log_m)).sum(-1) + (1 - beta) * (log_p.exp() * (log_p - log_m)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


def importance_weights(proximal_logprobs: np.ndarray, sampler_logprobs: np.ndarray, correction: str,
                       threshold: float, level: str = "token") -> tuple[np.ndarray, np.ndarray]:
    """The off-policy weights of one sample's tokens, w_t = pi_old(y_t) / mu(y_t), as they are and
    corrected (two float32 arrays, one value per completion token): `proximal_logprobs` log pi_old, the trainer's recomputed T = 1 logprobs
    of the policy it holds at the epoch's start; `sampler_logprobs` log mu, the sampler's.
    correction none: w; tis: min(w, threshold) (truncated IS: Ionides 2008; Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training", slime --use-tis); mis: w where
    it lies in [1/threshold, threshold] and 0 elsewhere, per token or (level geometric) for the whole
    sequence by the geometric mean of its weights (masked IS: verl's rollout_is mask mode, NeMo-RL's
    ICE-POP). A weight is data: the gradient flows through the ratio it multiplies."""
    log_w = np.clip(np.asarray(proximal_logprobs, np.float64) - np.asarray(sampler_logprobs, np.float64), -50.0, 50.0)
    raw = np.exp(log_w)
    if correction == "none":
        corrected = raw
    elif correction == "tis":
        corrected = np.minimum(raw, threshold)
    elif correction == "mis":
        bound = math.log(threshold)
        kept = np.abs(log_w) <= bound if level == "token" else np.full(len(raw), len(raw) == 0 or abs(log_w.mean()) <= bound)
        corrected = np.where(kept, raw, 0.0)
    else:
        raise ValueError(f"unknown importance correction {correction!r}")
    return raw.astype(np.float32), corrected.astype(np.float32)


@dataclass
class PolicyLossStats:
    """Sums over the masked tokens of a micro-batch; divide by `tokens` for means."""

    tokens: int
    ratio_sum: float
    ratio_max: float
    clipped: int


def policy_loss(
    logprobs_B_T: torch.Tensor,
    proximal_logprobs_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    normaliser: float | torch.Tensor,
    clip_epsilon: float = 0.0,
    ratio_cap: float = 0.0,
    is_weights_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """L = -sum_t rho_t A_t / normaliser over masked tokens; see the module docstring.

    rho_t = r_t w_t: r_t = pi_theta / pi_old, `proximal_logprobs_B_T` log pi_old, the policy the
    trainer held when the epoch started (its move since then, which PPO clips and whose stats are
    reported), and `is_weights_B_T` w_t, the corrected off-policy weight pi_old / mu of the sampler
    (`importance_weights`; None: 1). Decoupled PPO (Hilton et al. 2021, "Batch size-invariance for
    policy optimization"), as verl and slime split their rollout weights from the PPO ratio.
    """
    mask_B_T = mask_B_T.bool()
    # pi_old, the weights and the advantages are data: only log pi_theta carries gradient.
    proximal_B_T, advantages_B_T = proximal_logprobs_B_T.detach(), advantages_B_T.detach()
    weights_B_T = torch.ones_like(proximal_B_T) if is_weights_B_T is None else is_weights_B_T.detach()
    ratio_B_T = torch.exp(logprobs_B_T - proximal_B_T)
    rho_B_T = ratio_B_T * weights_B_T
    clipped_B_T = torch.zeros_like(mask_B_T)
    if ratio_cap:
        clipped_B_T = rho_B_T > ratio_cap
        weighted_B_T = torch.clamp(rho_B_T, max=ratio_cap) * advantages_B_T
    else:
        weighted_B_T = rho_B_T * advantages_B_T
    if clip_epsilon:
        clipped_ratio_B_T = torch.clamp(ratio_B_T, 1 - clip_epsilon, 1 + clip_epsilon) * weights_B_T
        clipped_B_T = clipped_ratio_B_T * advantages_B_T < weighted_B_T
        weighted_B_T = torch.minimum(weighted_B_T, clipped_ratio_B_T * advantages_B_T)
    loss = -(weighted_B_T * mask_B_T).sum() / normaliser
    with torch.no_grad():
        ratios = ratio_B_T[mask_B_T]
        stats = PolicyLossStats(
            tokens=int(mask_B_T.sum()),
            ratio_sum=float(ratios.sum()),
            ratio_max=float(ratios.max()) if ratios.numel() else 1.0,
            clipped=int((clipped_B_T & mask_B_T).sum()),
        )
    return loss, stats
