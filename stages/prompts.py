"""Prompt files: rows with a `prompt` string or a chat `messages` list, an optional `id` and `answer`,
and with several teachers the field score.route_by that names the row's teacher.

`messages` go through each model's own chat template with the generation prompt appended: the
student's here (with generate.chat_template_kwargs), the teacher's in `score` (with
score.chat_template_kwargs), so each model sees the conversation in the format it was trained on
(the fault of scoring a teacher on the student's format: tinker-cookbook issue #796), the teacher's
followed by score.assistant_prefix: what the student's generation prompt already holds of the
assistant's turn (a thinking student's opened `<think>`), which the teacher's template leaves to the
model; kd warns when the student's generation prompt ends in such text the teacher's lacks. The last
message must not be the assistant's: the model answers a turn, it does not continue one. A `prompt`
string is used verbatim (completion-style): both models get the same token ids. An `answer` is a
string, a number or a mapping (kept as JSON: e.g. a HumanEval problem's {prompt, test, entry_point},
kd.stages.tasks.code); the task's verifier reads it. Every bad row is a one-line error naming the
file, the row and the field.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd.stages.config import DEFAULT_TEACHER
from kd.stages.datasets_io import read_prompt_rows
from kd.stages.errors import KdError
from kd.stages.tasks import ANSWER_FORMATS


@dataclass(frozen=True)
class Prompt:
    id: str
    token_ids: list[int]
    answer: str | None  # a mapping as JSON
    messages: str | None = None  # the chat as JSON (each model renders it with its own template); None: a plain prompt
    teacher: str = DEFAULT_TEACHER  # the teacher that scores its samples (config score.route_by)


def render(messages: list[dict], tokenizer, template_kwargs: dict[str, Any], assistant_prefix: str = "") -> list[int]:
    """Token ids of `messages` in `tokenizer`'s chat template, ready for the assistant's answer, with
    `assistant_prefix` after the generation prompt: the rendered text and the prefix tokenized as one
    text (as apply_chat_template itself tokenizes), so the ids are those of a template whose
    generation prompt ended in the prefix."""
    if not assistant_prefix:
        return list(tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False, **template_kwargs
        ))
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template_kwargs)
    return tokenizer.encode(text + assistant_prefix, add_special_tokens=False)


def generation_prompt(messages: list[dict], tokenizer, template_kwargs: dict[str, Any]) -> str | None:
    """The text `tokenizer`'s template adds to `messages` for the assistant's turn (its generation
    prompt: the assistant header, and in some templates the turn's opening, e.g. Qwen3-Thinking-2507's
    `<think>\n`); None when it cannot be told apart: the rendering with it does not extend the one
    without (a template that ends a turn differently then, e.g. with an end-of-text token), or the
    template fails without it."""
    try:
        with_it, without = (tokenizer.apply_chat_template(messages, add_generation_prompt=add, tokenize=False,
                                                          **template_kwargs) for add in (True, False))
    except Exception:  # noqa: BLE001 - any template error: the comparison is skipped, rendering itself is checked elsewhere
        return None
    return with_it[len(without):] if with_it.startswith(without) else None


def expected_prefix(student: str, teacher: str) -> str:
    """The assistant_prefix that makes the teacher's generation prompt `teacher` end as the student's
    `student` does: what the student's holds past the teacher's (a thinking student's `<think>\n`
    against a hybrid teacher's bare header), "" when it does not extend the teacher's (the same
    prompt, or a teacher prompt that holds more of its own format: an empty think block)."""
    return student[len(teacher):] if student.startswith(teacher) else ""


def load(path: str | Path, tokenizer, max_prompt_tokens: int, template_kwargs: dict[str, Any] | None = None,
         limit: str = "the model's context leaves after max_new_tokens; shorten it or lower max_new_tokens",
         route_by: str = "", teachers: tuple[str, ...] = (), task: str = "") -> list[Prompt]:
    """Every row of a prompt file, tokenized; `limit` says where `max_prompt_tokens` comes from. With
    `route_by`, each row's field of that name picks its teacher among `teachers` (absent or null:
    the default teacher). An answer must have the structure `task`'s verifier reads (if any)."""
    structure, has_it = ANSWER_FORMATS.get(task, ("", lambda answer: True))
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
        if answer is not None and not isinstance(answer, (str, int, float, dict)):
            raise KdError(f"{where}: field answer: expected a string, number or mapping, got {type(answer).__name__}")
        if isinstance(answer, dict):
            answer = json.dumps(answer, ensure_ascii=False)
        if answer is not None and not has_it(str(answer)):
            raise KdError(f"{where}: field answer: task {task} checks answers that are {structure}, got {str(answer)[:40]!r}")
        teacher = row.get(route_by) if route_by else None
        if teacher is not None and teacher not in teachers:
            raise KdError(f"{where}: field {route_by}: {teacher!r} names no teacher; score.teachers has "
                          f"{', '.join(t for t in teachers if t != DEFAULT_TEACHER)} (drop the field for the default teacher)")
        prompts.append(Prompt(prompt_id, ids, None if answer is None else str(answer), messages, teacher or DEFAULT_TEACHER))
    if route_by and not any(route_by in row for row in rows):  # a misspelt field would route everything silently
        print(f"kd: warning: {path}: no row has the field {route_by!r} (score.route_by), so every prompt of it goes "
              "to the default teacher", file=sys.stderr)
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
