"""Peak memory and speed of one train step at a real vocabulary: kd before the chunked head, kd now,
and TRL's DistillationTrainer loss, on the same synthetic model, in one run.

    python bench/memory.py            (just bench-memory)

The model: a 2-layer Qwen3 of hidden size 64 with Qwen's vocabulary (151,936), a LoRA of rank 16
on every projection (as train.lora_target_modules), float32 on the CPU; one sequence of 512 prompt
tokens and C completion tokens, C in 1k, 4k, 16k. Each case runs in a fresh process: the model is
built, the peak-RSS window reset (/proc/self/clear_refs), then one forward + backward of the loss;
"peak above the model" is the window's VmHWM minus the RSS before the step.
- kd before: the train stage's loss as it was (the model's logits at every position, [1, L, V]
  float32, log-softmax gather, entropy in chunks, the policy-gradient loss);
- kd now: `kd.stages.objective.step_loss` (hidden states, completion positions only, the head a chunk
  of rows at a time, recomputed in backward);
- TRL: `trl.trainer.distillation_trainer._chunked_divergence_loss` (TRL 1.16) with beta = 1
  (reverse KL), the student's hidden states at the completion positions and a teacher forward
  (the same synthetic architecture) in the same process, as its DistillationTrainer runs it.
Writes bench/results/memory.json and memory.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VOCABULARY = 151_936
PROMPT = 512
COMPLETIONS = (1024, 4096, 16384)
METHODS = ("kd before", "kd now", "TRL DistillationTrainer loss")
# [1, L, V] float32 logits, their float copy and log-softmax and its gradient: ~40 GB at 16k, over this machine's 24.
SKIP = {("kd before", 16384): "did not fit: [1, 16896, 151936] float32 logits are 10.3 GB, needed about 4 times"}


def rss_gib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 2**20 for line in status if line.startswith(field + ":"))


def model_and_batch(completion: int, top_k: int = 0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from kd.stages.config import TrainConfig
    from kd.stages.train import Collator

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCABULARY, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                         max_position_embeddings=32768)
    cfg = TrainConfig()
    model = get_peft_model(Qwen3ForCausalLM(config), LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM"))
    ids = torch.randint(0, VOCABULARY, (PROMPT + completion,)).numpy()
    noise = torch.randn(completion).numpy() * 0.1 - 2
    example = {"input_ids": ids, "prompt_length": PROMPT, "sampler_logprobs": noise, "policy_logprobs": noise,
               "teacher_logprobs": noise - 0.5, "advantages": -0.5 + 0 * noise}
    return model, Collator(0, top_k)([example]), cfg


def step(method: str, completion: int) -> dict:
    """One forward + backward; memory and time of the step alone (the model is built before)."""
    import torch

    from kd.stages import loss as loss_lib
    from kd.stages.models import OutputHead, hidden_states
    from kd.stages.objective import step_loss

    model, batch, cfg = model_and_batch(completion)
    mask = batch["shift_labels"] != -100
    teacher = None
    if method.startswith("TRL"):
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        teacher = model_and_batch(completion)[0].eval()
    head = OutputHead(model) if method == "kd now" else None
    before = rss_gib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    started = time.perf_counter()
    if method == "kd before":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        lse = torch.logsumexp(logits, -1)
        logprobs = logits.gather(-1, batch["shift_labels"].clamp(min=0)[..., None])[..., 0] - lse
        with torch.no_grad():
            for row in logits[mask].split(1024):
                logp = torch.log_softmax(row, -1)
                float(-(logp.exp() * logp).sum())
        loss, _ = loss_lib.policy_loss(logprobs, batch["sampler_logprobs"], batch["advantages"], mask, mask.sum())
    elif method == "kd now":
        loss = step_loss(model, head, batch, cfg, mask.sum(), 1).loss
    else:
        completion_mask = mask[:, PROMPT - 1:]
        student = hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, PROMPT - 1 : -1]
        with torch.no_grad():
            teacher_hidden = hidden_states(teacher, batch["input_ids"], batch["attention_mask"])[:, PROMPT - 1 : -1]
        weight = model.get_output_embeddings().weight
        loss = _chunked_divergence_loss(student, teacher_hidden, weight, teacher.get_output_embeddings().weight,
                                        completion_mask, beta=1.0)[0]
    loss.backward()
    seconds = time.perf_counter() - started
    return {"peak_above_model_gib": rss_gib("VmHWM") - before, "seconds": seconds,
            "tokens_per_second": completion / seconds}


def main() -> None:
    if len(sys.argv) == 3:  # a child process: one case
        print(json.dumps(step(sys.argv[1], int(sys.argv[2]))))
        return
    rows = []
    for completion in COMPLETIONS:
        for method in METHODS:
            row = {"method": method, "prompt": PROMPT, "completion": completion}
            if (method, completion) in SKIP:
                row["skipped"] = SKIP[method, completion]
            else:
                done = subprocess.run([sys.executable, __file__, method, str(completion)], capture_output=True,
                                      text=True, cwd=ROOT)
                if done.returncode:
                    raise SystemExit(f"{method} at {completion}: {done.stderr[-2000:]}")
                row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            rows.append(row)
            print(row, flush=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "vocabulary": VOCABULARY, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# One train step at a 151,936-token vocabulary: peak memory above the model, and speed",
        "",
        f"{result['machine']}; {result['date']}; `python bench/memory.py`. A 2-layer, 64-wide Qwen3 with LoRA rank 16, "
        f"float32, one sequence of {PROMPT} prompt tokens + C completion tokens, one forward + backward.",
        "",
        "| completion tokens | method | peak above the model (GiB) | completion tokens / s |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['completion']} | {row['method']} | {row['skipped']} | |")
        else:
            lines.append(f"| {row['completion']} | {row['method']} | {row['peak_above_model_gib']:.2f} | "
                         f"{row['tokens_per_second']:.0f} |")
    (RESULTS / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
