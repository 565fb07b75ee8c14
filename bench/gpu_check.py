"""The GPU memory plan of `kd loop` on one GPU: the engines sleep while train runs (kd.stages.session).

    bash bench/gpu_check.sh         a bare GPU machine with this tree copied: puts kd on the path, runs this,
                                    then the engine tests of tests/test_gpu.py
    python bench/gpu_check.py       where kd is installed

Builds a small toy world with `kd toy` (the sizes of tests/conftest.py's tiny world), then runs two
epochs of `kd loop` on the GPU: generate and score on in-process vLLM, each at the default 0.9 of the
GPU, the student's engine placed with `device: cuda:0` (on hf engines on the GPU where vLLM is not
installed), and training on the same GPU. Records per stage call its wall seconds, this process's
peak GPU memory (peak_gpu_gib: the trainer's, an hf engine's), the GPU memory in use by every process
at its end (gpu_used_gib: vLLM's engine processes included), and every sleep and wake with its
duration. Writes gpu_check.json and gpu_check.md into $OUT when it is set, else bench/results/; exits
1 when vLLM ran and train's records show an engine awake (a quarter of the GPU or more in use).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORLD = "runs/gpu-check-world"
TOY = {"width": 64, "teacher_layers": 2, "student_layers": 1, "teacher_steps": 120, "student_steps": 20,
       "student_stop_accuracy": 1.0, "sft_batch_size": 32, "vocab_size": 280, "train_prompts": 96, "heldout_prompts": 16}


def loop_settings(vllm: bool) -> list[str]:
    if vllm:  # bfloat16: vLLM's GPU attention takes no float32; eager: no CUDA graphs for a toy
        engine = {"kind": "vllm", "dtype": "bfloat16", "max_model_len": 256, "enforce_eager": True}
        engines = {"generate": {**engine, "device": "cuda:0"}, "score": {**engine, "device": "auto"}}
    else:
        engines = {section: {"kind": "hf", "dtype": "float32", "device": "cuda"} for section in ("generate", "score")}
    settings = {
        "run_id": "gpu-check", "runs_dir": "runs", "epochs": 2, "student": f"{WORLD}/student", "teacher": f"{WORLD}/teacher",
        "generate.prompts": f"{WORLD}/prompts/train.jsonl.zst", "generate.prompts_per_epoch": 16,
        "generate.samples_per_prompt": 2, "generate.max_new_tokens": 40, "score.self_check": 0,
        "train.batch_size": 8, "train.grad_accum": 2, "train.learning_rate": 3e-3, "train.warmup_steps": 0,
        "train.device": "cuda:0", "eval.prompts": f"{WORLD}/prompts/heldout.jsonl.zst", "eval.num_prompts": 16,
        "eval.every": 1,
        **{f"{section}.engine.{name}": value for section, engine in engines.items() for name, value in engine.items()},
    }
    return [f"{key}={value}" for key, value in settings.items()]


class Lines(logging.Handler):
    """kd's stage, sleep and wake lines, kept for the results."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []
        self.started = time.time()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.created - self.started:6.1f}s {record.getMessage()}")


def main() -> int:
    import torch

    from kd.stages import config as config_lib, loop, rundir

    os.chdir(ROOT)
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing to check")
        return 0
    vllm = importlib.util.find_spec("vllm") is not None
    started = time.time()
    toy = [f"--set=toy.{name}={value}" for name, value in TOY.items()]
    subprocess.run([sys.executable, "-m", "kd.cli.main", "toy", f"--set=toy_dir={WORLD}", *toy], check=True)
    built = time.time()

    lines = Lines()
    logging.getLogger("kd.stages").addHandler(lines)
    logging.getLogger("kd.stages").setLevel(logging.INFO)
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    config = config_lib.load(None, loop_settings(vllm))
    shutil.rmtree(config.run_dir, ignore_errors=True)  # measured afresh, never resumed
    loop.run(config)

    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    stages = [{key: record.get(key) for key in ("epoch", "stage", "wall_seconds", "peak_gpu_gib", "gpu_used_gib", "peak_rss_gib")}
              for record in rundir.read_metrics(config.run_dir) if "wall_seconds" in record]
    used = {stage: [s["gpu_used_gib"] for s in stages if s["stage"] == stage and s["gpu_used_gib"] is not None]
            for stage in ("generate", "train")}
    if not vllm:
        verdict = "hf engines only: vLLM is not installed here, its half was not run"
    elif not used["train"]:
        verdict = "no gpu_used_gib in the records (NVML: install nvidia-ml-py)"
    elif max(used["train"]) < 0.25 * total < 0.6 * total < min(used["generate"]):
        verdict = "engines asleep during train: under a quarter of the GPU in use, over 0.6 at generate's end"
    else:
        verdict = "FAILED: an engine was awake during train, or the student's engine not at generate"
    ok = not vllm or verdict.startswith("engines asleep")
    result = {
        "gpu": torch.cuda.get_device_name(0), "gpu_total_gib": round(total, 1), "torch": torch.__version__,
        "vllm": importlib.import_module("vllm").__version__ if vllm else None,
        "engines": "vllm (generate on cuda:0, score auto; gpu_memory_utilization 0.9 each)" if vllm else
                   "hf on cuda (vLLM not installed here)",
        "toy_world_seconds": round(built - started, 1), "loop_seconds": round(time.time() - built, 1),
        "stages": stages, "log": lines.lines,
        "verdict": verdict,
    }
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = [f"| {s['epoch']} | {s['stage']} | {s['wall_seconds']:.1f} | {fmt(s['peak_gpu_gib'])} | {fmt(s['gpu_used_gib'])} |"
            for s in stages]
    (out / "gpu_check.md").write_text("\n".join([
        f"# GPU memory plan: {result['gpu']} ({result['gpu_total_gib']} GiB), {result['engines']}", "",
        "| epoch | stage | seconds | peak GPU GiB (kd's process) | GPU GiB in use at its end (all processes) |",
        "|---|---|---|---|---|", *rows, "", f"verdict: {result['verdict']}", "",
        "sleep and wake (kd.stages.session):", "", *[f"    {line}" for line in lines.lines], ""]))
    print((out / "gpu_check.md").read_text())
    return 0 if ok else 1


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":  # vLLM spawns its engine processes
    sys.exit(main())
