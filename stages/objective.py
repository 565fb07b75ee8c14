"""The objective: named loss terms, each declaring the scored columns it reads, composed in one place.

    term              weight (train.*)        reads (scored columns)                                 math
    policy_gradient   kl_coef, reward_coef    sampler_logprobs, teacher_logprobs, reward, teacher    loss.policy_loss
    topk_reverse_kl   topk_reverse_kl         teacher_top_ids, teacher_top_logprobs                  loss.topk_divergence
    topk_forward_kl   topk_forward_kl         teacher_top_ids, teacher_top_logprobs                  loss.topk_divergence
    topk_jsd          topk_jsd (jsd_beta)     teacher_top_ids, teacher_top_logprobs                  loss.topk_divergence

The policy-gradient term always runs: its importance ratios are the step's health metrics and
train.max_ratio's abort, and with kl_coef = reward_coef = 0 its advantages, so its loss, are 0.
The others run at weight > 0. The config refuses a term that reads columns score will not write
(the top-k terms without score.top_k). Adding a term over the columns train already collates: a
`Term` in TERMS (its weight, columns and loss) and its weight field in kd.stages.config.TrainConfig.

The declarations are torch-free, because the config validates against them; the functions that
compute run inside train and import torch's side (kd.stages.loss, kd.stages.models) when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from kd.stages.config import TrainConfig
    from kd.stages.loss import PolicyLossStats

IGNORE = -100  # label of the positions that are not completion tokens (prompt, padding)
TOP_K_COLUMNS = ("teacher_top_ids", "teacher_top_logprobs")


@dataclass(frozen=True)
class Term:
    """A loss term. `weight`: the TrainConfig field that scales it (0: off); `columns`: the scored
    columns it reads (train loads the top-k ones only when a term declares them); `loss(student_N_K,
    data, cfg)`: its sum over the N completion positions of a micro-batch, from the student's
    logprobs there ([N, 1 + K]: the sampled token, then the teacher's top-k) and the per-token
    columns train collates, at those positions: sampler_logprobs, policy_logprobs (pi_old),
    sampling_policy_logprobs (the trainer's of the policy that sampled), is_weights and raw_is_weights
    (the off-policy weights corrected and as they are), teacher_logprobs,
    advantages [N] and, with top-k, teacher_top_ids, teacher_top_logprobs [N, K].
    A term over another scored column also adds it to train.features and train.Collator. The policy
    gradient has no `loss`: it is the base every other term is added to (`step_loss`)."""

    name: str
    weight: str
    columns: tuple[str, ...]
    loss: Callable[["torch.Tensor", dict, "TrainConfig"], "torch.Tensor"] | None = None

    @property
    def needs_top_k(self) -> bool:
        return any(column in TOP_K_COLUMNS for column in self.columns)


def topk_term(kind: str) -> Callable[["torch.Tensor", dict, "TrainConfig"], "torch.Tensor"]:
    def summed(student_N_K: "torch.Tensor", data: dict, cfg: "TrainConfig") -> "torch.Tensor":
        from kd.stages.loss import topk_divergence

        return topk_divergence(student_N_K[:, 1:], data["teacher_top_logprobs"], kind, cfg.jsd_beta).sum()

    return summed


POLICY_GRADIENT = Term("policy_gradient", "kl_coef", ("sampler_logprobs", "teacher_logprobs", "reward", "teacher"))
TERMS = (
    POLICY_GRADIENT,
    Term("topk_reverse_kl", "topk_reverse_kl", TOP_K_COLUMNS, topk_term("reverse_kl")),
    Term("topk_forward_kl", "topk_forward_kl", TOP_K_COLUMNS, topk_term("forward_kl")),
    Term("topk_jsd", "topk_jsd", TOP_K_COLUMNS, topk_term("jsd")),
)


def active(cfg: "TrainConfig") -> list[Term]:
    """The terms this config trains with: the policy gradient always, the others at weight > 0."""
    return [term for term in TERMS if term is POLICY_GRADIENT or getattr(cfg, term.weight)]


def student_logprobs(model, head, batch: dict) -> tuple["torch.Tensor", float, "torch.Tensor"]:
    """The student's logprobs at the N completion positions of a collated batch or packed row
    (kd.stages.train.Collator), [N, 1 + K] (the sampled token, then the teacher's top-k when the batch has them), the
    sum of its entropy there, and the [B, T] completion mask. The model returns hidden states and
    `head` (kd.stages.models.OutputHead) runs a chunk at a time: no [B, T, V] logits (kd.stages.loss)."""
    import torch

    from kd.stages.loss import completion_logprobs
    from kd.stages.models import hidden_states

    mask_B_T = batch["shift_labels"] != IGNORE
    hidden_N_H = hidden_states(model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))[:, :-1][mask_B_T]
    targets_N_K = batch["shift_labels"][mask_B_T][:, None]
    if "teacher_top_ids" in batch:  # one pass of the head for the sampled token and the teacher's top-k
        targets_N_K = torch.cat([targets_N_K, batch["teacher_top_ids"][mask_B_T]], -1)
    picked_N_K, entropy = completion_logprobs(hidden_N_H, head, targets_N_K)
    return picked_N_K, entropy, mask_B_T


@dataclass
class StepLoss:
    """A micro-batch's objective. `loss`: what to backpropagate (scaled by the process count, as DDP
    averages gradients over processes while `normaliser` already counts all of their tokens);
    `batch_share`: its share of the effective batch's loss; `stats`: the policy gradient's ratio stats;
    `kl_sum`, `entropy_sum`: sums over its completion tokens of p_t - q_t and of the student's entropy;
    `mismatch_sum`: of |s_t - b_t|, sampler against the trainer's logprob of the same policy;
    `corrected`: tokens whose off-policy weight train.is_correction changed; `weights_N`: the
    uncorrected weights pi_old / mu, [N] on the CPU (their quantiles are a step's metrics)."""

    loss: "torch.Tensor"
    batch_share: float
    stats: "PolicyLossStats"
    kl_sum: float
    entropy_sum: float
    mismatch_sum: float
    corrected: int
    weights_N: "torch.Tensor"


def step_loss(model, head, batch: dict, cfg: "TrainConfig", normaliser, processes: int) -> StepLoss:
    """Every active term on a collated micro-batch, each summed over its completion tokens and divided
    by `normaliser`, the completion tokens of the whole effective batch over all processes."""
    import torch

    from kd.stages.loss import policy_loss

    student_N_K, entropy, mask_B_T = student_logprobs(model, head, batch)
    data = {name: batch[name][mask_B_T] for name in ("sampler_logprobs", "policy_logprobs", "sampling_policy_logprobs",
                                                      "is_weights", "raw_is_weights", "teacher_logprobs", "advantages", *TOP_K_COLUMNS)
            if name in batch}
    everywhere_N = mask_B_T.new_ones(len(student_N_K))
    loss, stats = policy_loss(
        student_N_K[:, 0], data["policy_logprobs"], data["advantages"], everywhere_N, normaliser,
        cfg.clip_epsilon, cfg.ratio_cap, data["is_weights"],
    )
    for term in active(cfg):
        if term.loss is not None:
            loss = loss + getattr(cfg, term.weight) * term.loss(student_N_K, data, cfg) / normaliser
    with torch.no_grad():
        weights_N = data["raw_is_weights"].float().cpu()
        corrected = int((data["is_weights"].float().cpu() != weights_N).sum())
        mismatch_sum = float((data["sampler_logprobs"] - data["sampling_policy_logprobs"]).abs().sum())
        kl_sum = float((data["policy_logprobs"] - data["teacher_logprobs"]).sum())
    return StepLoss(loss * processes, float(loss.detach()), stats, kl_sum, entropy, mismatch_sum, corrected, weights_N)
