"""Engine throughput on the toy world: hf vs vLLM in-process vs vLLM server, same machine, one run.

    python bench/engines.py            # after `just loop` (uses runs/toy/0000/adapter)

Measures, for each engine: start-up time (construction until ready, including a vLLM server's
process start), generate tokens/s (the student with the epoch-0 LoRA adapter, 256 samples of up to
48 tokens at T=1) and score tokens/s (the teacher's logprob of every completion token of those
samples). Each timed call follows one warm-up call on a few prompts. Writes
bench/results/engines.json and bench/results/engines.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def measure(name: str, make_student, make_teacher, prompts, seeds, adapter) -> dict:
    from kd.stages.engines import SamplingParams

    params = SamplingParams(48)
    t0 = time.perf_counter()
    student = make_student()
    student_start = time.perf_counter() - t0
    student.sample(prompts[:8], seeds[:8], params, adapter)  # warm-up (vLLM compiles, loads the adapter)
    t0 = time.perf_counter()
    completions = student.sample(prompts, seeds, params, adapter)
    generate_seconds = time.perf_counter() - t0
    sequences = [p + c.token_ids for p, c in zip(prompts, completions)]
    starts = [len(p) for p in prompts]
    tokens = sum(len(c.token_ids) for c in completions)
    t0 = time.perf_counter()
    teacher = make_teacher()
    teacher_start = time.perf_counter() - t0
    teacher.score(sequences[:8], starts[:8])
    t0 = time.perf_counter()
    teacher.score(sequences, starts)
    score_seconds = time.perf_counter() - t0
    row = {
        "engine": name, "student_start_seconds": round(student_start, 2), "teacher_start_seconds": round(teacher_start, 2),
        "samples": len(prompts), "completion_tokens": tokens,
        "generate_tokens_per_second": round(tokens / generate_seconds, 1),
        "score_tokens_per_second": round(tokens / score_seconds, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    import torch

    from kd.stages import config as config_lib, prompts as prompts_lib
    from kd.stages.config import EngineConfig
    from kd.stages.session import load_tokenizer, make_engine
    from kd.stages.engines.vllm import serve_command, wait_until_ready

    config = config_lib.load()
    adapter = config.run_dir / "0000" / "adapter"
    if not (adapter / "manifest.json").is_file():
        raise SystemExit(f"{adapter}: missing; run `just loop` first")
    tokenizer = load_tokenizer(config.student)
    chosen = prompts_lib.choose(prompts_lib.load(config.generate.prompts, tokenizer, 200), 64, 0, 0)
    prompts = [p.token_ids for p in chosen for _ in range(4)]
    seeds = list(range(len(prompts)))
    rank = config.train.lora_rank
    hf = EngineConfig(kind="hf", dtype="float32", device="cpu")
    vllm = EngineConfig(kind="vllm", dtype="float32", max_model_len=256)
    rows = [
        measure("hf", lambda: make_engine(hf, config.student, tokenizer, rank),
                lambda: make_engine(hf, config.teacher, tokenizer), prompts, seeds, adapter),
        measure("vllm (in-process)", lambda: make_engine(vllm, config.student, tokenizer, rank),
                lambda: make_engine(vllm, config.teacher, tokenizer), prompts, seeds, adapter),
    ]
    servers = []

    def served(model: str, port: int, lora: int | None):
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
        command = serve_command(model, port, "float32", lora) + ["--max-model-len", "256"]
        servers.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, 600, servers[-1])
        return make_engine(EngineConfig(kind="vllm", server=url), model, tokenizer)

    try:
        rows.append(measure("vllm (server)", lambda: served(config.student, 8711, rank),
                            lambda: served(config.teacher, 8712, None), prompts, seeds, adapter))
    finally:
        for server in servers:
            server.kill()
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
            "torch": torch.__version__, "vllm": __import__("vllm").__version__}
    (RESULTS / "engines.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [f"# Engine throughput on the toy world ({meta['date']}; {meta['machine']}; torch {meta['torch']}, "
             f"vLLM {meta['vllm']}; float32)", "",
             "| engine | student start (s) | teacher start (s) | generate tokens/s | score tokens/s |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['engine']} | {r['student_start_seconds']} | {r['teacher_start_seconds']} | "
              f"{r['generate_tokens_per_second']} | {r['score_tokens_per_second']} |" for r in rows]
    lines += ["", f"{rows[0]['samples']} samples, {rows[0]['completion_tokens']} completion tokens per engine "
              "(hf); generate uses the epoch-0 LoRA adapter. The student engine stays alive while the teacher's "
              "starts, as in `kd loop`, so the teacher's start-up shares the 2 cores with it. On this tiny model "
              "vLLM's per-step CPU overheads dominate; its batching pays off on GPUs and real model sizes. "
              "Produced by `python bench/engines.py`."]
    (RESULTS / "engines.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
