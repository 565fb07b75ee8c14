"""The engine protocol and the types it speaks: what the stages need from a model runtime.

    sample(prompts, seeds, params, adapter) -> completions with the sampler's logprob of every token
    score(sequences, prompt_lengths, top_k)  -> the model's logprob of every completion token, and
                                                optionally its top-k tokens at every completion position
    close()                                  -> release processes, servers' sessions, GPU memory

Reproducibility: each sample draws its randomness from its own generator seeded by
(run seed, epoch, prompt id, sample index) (see `sample_seed`), never from the batch layout, so
the same sample comes out whether prompts are batched, sharded or resumed differently.
Torch-free: the config and the data layer import it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (an end-of-turn token was sampled) or "length"


@dataclass
class Scores:
    """A scorer's view of one sequence's completion: T tokens, K = top_k (0: no top-k asked for)."""

    logprobs: np.ndarray  # [T] float32: logprob of each completion token
    top_ids: np.ndarray  # [T, K] int32: the K most likely tokens at each completion position, most likely first
    top_logprobs: np.ndarray  # [T, K] float32: their logprobs

    @classmethod
    def without_top_k(cls, logprobs: np.ndarray) -> "Scores":
        empty = np.zeros((len(logprobs), 0))
        return cls(np.asarray(logprobs, np.float32), empty.astype(np.int32), empty.astype(np.float32))


class Engine(Protocol):
    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        seeds: Sequence[int],
        params: SamplingParams,
        adapter: Path | None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """One completion per prompt; `prompts` repeats a prompt once per wanted sample."""

    def score(
        self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
        progress: Callable[[int], None] | None = None, top_k: int = 0,
    ) -> list[Scores]:
        """Logprob of each token after the prompt (and the top_k most likely tokens there), one per sequence."""

    def close(self) -> None:
        """Release what the engine holds (engine-core processes, GPU memory); the engine is not used after."""


def sample_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def length_batches(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices grouped by similar length so that a padded batch holds at most `max_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # ascending order: the newcomer is the longest of its batch
        if current and (longest * (len(current) + 1) > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


