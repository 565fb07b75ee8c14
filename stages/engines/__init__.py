"""Engines: the model runtimes that sample (generate) and score (score, eval) for the stages.

    base.py   the protocol (sample, score, close) and its types: SamplingParams, Completion, Scores
    hf.py     transformers in-process (CPU or GPU), adapters loaded with PEFT
    vllm.py   vLLM in-process (`vllm.LLM`) or a running `vllm serve` over HTTP
    sglang.py a running SGLang server over its native /generate API
    http.py   what the server engines share: JSON over HTTP, retries, timeouts, bounded concurrency

Adding an engine: a module with a `build(engine, model_path, stop_token_ids, pad_token_id,
lora_rank, seed, max_logprobs, student_rows)` function returning an object with the protocol's three
methods (a scorer takes its top-k among ids < student_rows: see base.py), and one line in REGISTRY
(its name becomes a valid `engine.kind`, and with `server=True` a valid kind for `engine.server`).
The stages never know which engine they drive. This package's __init__ and base are torch-free (the config imports them).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Sequence

from kd.stages.engines.base import (Completion, Engine, SamplingParams, Scores, length_batches, output_rows,
                                    sample_seed, student_top_k, top_k_asked, top_k_rows)

@dataclass(frozen=True)
class Registered:
    """`module`: where `build` lives (imported only when used: vLLM and SGLang are optional);
    `server`: whether it can be a client of a running server (`engine.server: URL`); `local`:
    whether it can run in kd's process (else engine.server is required)."""

    module: str
    server: bool = False
    local: bool = True


# engine.kind -> its registration
REGISTRY = {
    "hf": Registered("kd.stages.engines.hf"),
    "vllm": Registered("kd.stages.engines.vllm", server=True),
    "sglang": Registered("kd.stages.engines.sglang", server=True, local=False),
}

__all__ = ["REGISTRY", "Completion", "Registered", "Engine", "SamplingParams", "Scores", "length_batches", "make",
           "output_rows", "sample_seed", "student_top_k", "top_k_asked", "top_k_rows"]


def make(engine, model_path: str, stop_token_ids: Sequence[int], pad_token_id: int, lora_rank: int | None = None,
         seed: int = 0, max_logprobs: int = 0, student_rows: int | None = None,
         attn_implementation: str = "auto") -> Engine:
    """The engine `engine.kind` (an EngineConfig) for `model_path`. `lora_rank`: set for a student that
    will load adapters; `max_logprobs`: for a scorer asked for that many top tokens (K); `student_rows`:
    for a scorer, the rows of the student's output head, among whose ids its top-k is taken (None: all
    of the model's; see base.py); `attn_implementation`: train.attn_implementation, which the hf
    engine follows (vLLM and SGLang choose their own attention backends)."""
    module = importlib.import_module(REGISTRY[engine.kind].module)
    return module.build(engine, model_path, stop_token_ids, pad_token_id=pad_token_id, lora_rank=lora_rank,
                        seed=seed, max_logprobs=max_logprobs, student_rows=student_rows,
                        attn_implementation=attn_implementation)
