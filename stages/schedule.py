"""The learning-rate schedule: warmup, then constant, linear or cosine decay over the whole run's
optimiser steps (epochs x steps per epoch), never restarted at an epoch. Because the total depends
on `epochs`, a started run refuses a new `epochs` under a decaying schedule (kd.stages.rundir)."""

from __future__ import annotations

import math

from kd.stages.config import Config, TrainConfig


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning-rate multiplier at global optimiser step `step` (0-based) of the whole run."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return 1.0 - progress if cfg.lr_scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(config: Config) -> int:
    samples = config.generate.prompts_per_epoch * config.generate.samples_per_prompt
    return config.train.passes * math.ceil(samples / (config.train.batch_size * config.train.grad_accum))
