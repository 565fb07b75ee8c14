"""Answer verifiers that compare a completion's final answer with a reference: no model, no execution.

    last_integer   the completion's last integer is the answer (the toy's format; GSM8K's "#### 42")
    math_answer    the last \\boxed{} / final expression is mathematically equal to the reference,
                   by the `math-verify` library (Hugging Face's checker of the Open R1 and lighteval
                   math evaluations: LaTeX, fractions, decimals, sets and intervals compared with sympy)

Each takes (completions, answers): two lists of strings of the same length, and returns one reward
per completion, 1.0 (right) or 0.0 (wrong).
"""

from __future__ import annotations

import re


def last_integer(completions: list[str], answers: list[str]) -> list[float]:
    """1.0 where the completion's last integer is the answer (compared as strings: "007" is not "7")."""
    rewards = []
    for completion, answer in zip(completions, answers):
        numbers = re.findall(r"-?\d+", completion)
        rewards.append(float(bool(numbers) and numbers[-1] == answer))
    return rewards


def math_answer(completions: list[str], answers: list[str]) -> list[float]:
    """1.0 where math-verify finds the completion's answer equal to the reference.

    The reference may be bare ("42", "\\frac{1}{2}") or in \\boxed{}; the completion's answer is its
    last \\boxed{} or, failing that, its last expression (so a GSM8K-style "#### 42" counts). Runs in
    the calling thread, which must be the main one: math-verify bounds sympy with SIGALRM timeouts."""
    from math_verify import parse, verify

    return [float(verify(parse(answer), parse(completion))) for completion, answer in zip(completions, answers)]
