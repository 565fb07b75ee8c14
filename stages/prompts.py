"""Prompt files: rows with a `prompt` string or a chat `messages` list, an optional `id` and `answer`.

`messages` go through each model's own chat template with the generation prompt appended: the
student's here (with generate.chat_template_kwargs), the teacher's in `score` (with
score.chat_template_kwargs), so each model sees the conversation in the format it was trained on
(the fault of scoring a teacher on the student's format: tinker-cookbook issue #796). The last
message must not be the assistant's: the model answers a turn, it does not continue one. A `prompt`
string is used verbatim (completion-style): both models get the same token ids. Every bad row is a
one-line error naming the file, the row and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd.stages.datasets_io import read_prompt_rows
from kd.stages.errors import KdError


@dataclass(frozen=True)
class Prompt:
    id: str
    token_ids: list[int]
    answer: str | None
    messages: str | None = None  # the chat as JSON (each model renders it with its own template); None: a plain prompt


def render(messages: list[dict], tokenizer, template_kwargs: dict[str, Any]) -> list[int]:
    """Token ids of `messages` in `tokenizer`'s chat template, ready for the assistant's answer."""
    return list(tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False, **template_kwargs
    ))


def load(path: str | Path, tokenizer, max_prompt_tokens: int, template_kwargs: dict[str, Any] | None = None,
         limit: str = "the model's context leaves after max_new_tokens; shorten it or lower max_new_tokens") -> list[Prompt]:
    """Every row of a prompt file, tokenized; `limit` says where `max_prompt_tokens` comes from."""
    rows = read_prompt_rows(path)
    if not rows:
        raise KdError(f"{path}: no prompts in the file; add rows with a `prompt` or `messages` field")
    prompts, seen = [], set()
    for number, row in enumerate(rows, 1):
        where = f"{path}:{number}"
        if not isinstance(row, dict):
            raise KdError(f"{where}: expected a JSON object with `prompt` or `messages`")
        ids, messages = _token_ids(row, tokenizer, where, template_kwargs or {})
        if len(ids) > max_prompt_tokens:
            raise KdError(f"{where}: prompt is {len(ids)} tokens, more than the {max_prompt_tokens} that {limit}")
        prompt_id = str(row.get("id", f"row-{number}"))
        if prompt_id in seen:
            raise KdError(f"{where}: field id: {prompt_id!r} appears twice; ids must be unique")
        seen.add(prompt_id)
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise KdError(f"{where}: field answer: expected a string or number, got {type(answer).__name__}")
        prompts.append(Prompt(prompt_id, ids, None if answer is None else str(answer), messages))
    return prompts


def _token_ids(row: dict, tokenizer, where: str, template_kwargs: dict[str, Any]) -> tuple[list[int], str | None]:
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise KdError(f"{where}: field messages: expected a non-empty list of {{role, content}} strings")
        if not any(m["content"].strip() for m in messages):
            raise KdError(f"{where}: field messages: every message is empty; give the prompt some text")
        if messages[-1]["role"] == "assistant":
            # An SFT-shaped row: the student would see the answer in its own prompt, and the teacher score that.
            raise KdError(
                f"{where}: field messages: the last message is the assistant's answer, so there is no turn left to "
                "answer; drop the final assistant message (on-policy distillation samples the answer itself)"
            )
        return render(messages, tokenizer, template_kwargs), json.dumps(messages, ensure_ascii=False)
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise KdError(f"{where}: field prompt: expected a string, got {type(row['prompt']).__name__}")
        if not row["prompt"].strip():
            raise KdError(f"{where}: field prompt: empty; give the prompt some text or drop the row")
        return tokenizer.encode(row["prompt"], add_special_tokens=False), None
    raise KdError(f"{where}: missing field: each row needs `prompt` (a string) or `messages` (a chat list)")


def choose(prompts: list[Prompt], count: int, seed: int, epoch: int) -> list[Prompt]:
    """`count` distinct prompts, a function of (seed, epoch) only."""
    if count >= len(prompts):
        return list(prompts)
    order = np.random.default_rng([seed, epoch]).choice(len(prompts), size=count, replace=False)
    return [prompts[i] for i in sorted(order)]
