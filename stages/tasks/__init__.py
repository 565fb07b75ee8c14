"""Tasks: how a completion is checked against a prompt's reference `answer`, and the worlds kd builds.

    answers.py   answer verifiers (pure Python): `last_integer`
    toy.py       the toy world (`kd toy`): 3-digit sums, a tokenizer, a teacher and a weaker student
    real.py      the real world (`kd real`): SmolLM2-135M-Instruct, a pruned student, HumanEval prompts

The config's `task` names a verifier of VERIFIERS; generate and eval record `correct` with it for
every prompt that has an `answer` (the accuracy metric, and the task reward of train.reward_coef).
Adding a verifier: a function `(completion_text, answer) -> bool` and one line in VERIFIERS.
"""

from __future__ import annotations

from typing import Callable

from kd.stages.tasks.answers import last_integer

# config `task` -> verifier(completion_text, answer) -> whether the completion reached the answer.
VERIFIERS: dict[str, Callable[[str, str], bool]] = {"last-integer": last_integer}
