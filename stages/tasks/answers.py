"""Answer verifiers: did a completion reach a prompt's reference `answer`? Pure Python, no model."""

from __future__ import annotations

import re


def last_integer(completion: str, answer: str) -> bool:
    """The completion's last integer is the answer: the toy's (and GSM8K's "#### 42"-like) convention."""
    numbers = re.findall(r"-?\d+", completion)
    return bool(numbers) and numbers[-1] == answer
