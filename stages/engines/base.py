"""The engine protocol and the types it speaks: what the stages need from a model runtime.

    sample(prompts, seeds, params, adapter) -> completions with the sampler's logprob of every token
    score(sequences, prompt_lengths, top_k)  -> the model's logprob of every completion token, and
                                                optionally its top-k tokens at every completion position
    close()                                  -> release processes, servers' sessions, GPU memory
    sleep() / wake()                         -> optional, in-process engines: give the GPU memory back
                                                while other stages run, and take it back (see below)

A scorer's top-k is taken over the ids the student can emit. An engine is built with `student_rows`,
the rows of the student's output head (its config's vocab_size, `output_rows`), and chooses its K
tokens among ids < student_rows; None: among all its own. A teacher may have more rows than the
student (one family's checkpoints often share a tokenizer but not an embedding size: Qwen2.5 has
151,936 rows in its small models and 152,064 in its large ones). Its logprobs stay normalised over its
whole vocabulary, so the mass of the rows the student lacks falls in the tail bucket of the top-k
divergences (kd.stages.loss), and at K = student_rows the divergence is exact over what the student
can say. The logprob of each completion token (the sampled-token path) is the same either way.

Reproducibility: each sample draws its randomness from its own generator seeded by
(run seed, epoch, prompt id, sample index) (see `sample_seed`), never from the batch layout, so
the same sample comes out whether prompts are batched, sharded or resumed differently.

GPU memory plan: `kd loop` keeps its engines loaded across stages in one process
(kd.stages.session). An in-process engine on a GPU sleeps while a stage that does not use it runs
(train above all) and wakes when a stage asks for it again: vLLM in its sleep mode (level 1: the
weights, adapter included, to CPU RAM, the KV cache dropped), hf by moving the model to CPU memory.
On CPU both are no-ops; an engine without the two methods (a server's client) stays as it is.

Torch-free: the config and the data layer import it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from kd.stages.errors import KdError


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
        """Logprob of each token after the prompt (and the top_k most likely tokens there among ids <
        the engine's student_rows), one per sequence."""

    def close(self) -> None:
        """Release what the engine holds (engine-core processes, GPU memory); the engine is not used after."""

    # Optional (in-process engines); the session calls them in turn, never twice in a row.
    def sleep(self) -> None:
        """Give back the GPU memory the engine holds (no-op on CPU); it is not used again before wake()."""

    def wake(self) -> None:
        """Take back what sleep() gave: the same model and adapter, ready to sample and score."""


def output_rows(model_path: str | Path) -> int:
    """The rows of a model's output head, read from its config (vocab_size; the text model's for a
    multimodal config) without loading weights: the ids it can emit and score. Not len(tokenizer),
    which can be smaller (rows padded to a multiple of 64 or 128) or larger (ids without a row)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(model_path)).get_text_config().vocab_size)


def top_k_rows(top_k: int, model_rows: int | None, student_rows: int | None) -> int | None:
    """The ids a scorer chooses its top-k among (those below the number returned; None: all, neither
    count being known), after refusing in one line a top_k above that number."""
    known = [rows for rows in (model_rows, student_rows) if rows]
    rows = min(known) if known else None
    if rows is not None and top_k > rows:
        over = "" if student_rows in (None, model_rows) else f" over the student's ids (the {rows} rows of its output head)"
        raise KdError(f"score.top_k = {top_k} exceeds the teacher's vocabulary{over}; use at most {rows}")
    return rows


def top_k_asked(top_k: int, model_rows: int | None, student_rows: int | None) -> int:
    """How many top tokens to ask a runtime for so that the top_k best among ids < student_rows are
    among them: top_k plus the model's rows the student lacks (at most that many of the best are
    such ids). 0 for 0."""
    if not top_k or not (model_rows and student_rows):
        return top_k
    return top_k + max(0, model_rows - student_rows)


def student_top_k(candidates: Sequence[tuple[int, float]], top_k: int, student_rows: int | None) -> list[tuple[int, float]]:
    """The first top_k of (id, logprob) pairs, best first, whose ids are below student_rows (None: any);
    ValueError when fewer are there (the runtime answered fewer than `top_k_asked`)."""
    kept = [(token, logprob) for token, logprob in candidates if student_rows is None or token < student_rows][:top_k]
    if len(kept) < top_k:
        below = f" below {student_rows}" if student_rows is not None else ""
        raise ValueError(f"{len(kept)} top logprobs{below} at a position, {top_k} asked for")
    return kept


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


