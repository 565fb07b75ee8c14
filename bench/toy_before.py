"""configs/toy.yaml's objective and learning-rate schedule as they were before 2026-12-07.

Until then the toy config trained on the sampled-token reverse KL (the Thinking Machines recipe's
one-sample estimator, kd.stages.loss.policy_loss) at a constant learning rate; since then on the
teacher's top-8 reverse KL with cosine decay, which left 1 gradient spike in 800 optimiser steps
where the sampled token had 6 (BENCHMARKS.md, "Gradient spikes of the default loop"). The toy benchmarks measured before put these
`--set` overrides ahead of their own, so that each reproduces its results file.
"""

from __future__ import annotations

from pathlib import Path

SAMPLED_TOKEN_CONSTANT_LR = ("score.top_k=0", "train.kl_coef=1", "train.topk_reverse_kl=0", "train.lr_scheduler=constant")


def pinned(config_path: str | Path) -> tuple[str, ...]:
    """The overrides above for configs/toy.yaml, none for another config."""
    return SAMPLED_TOKEN_CONSTANT_LR if Path(config_path).name == "toy.yaml" else ()
