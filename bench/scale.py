"""What a real-size job needs of the train step, measured as ratios on this CPU machine.

    python bench/scale.py            (just bench-scale)

1. Activation checkpointing (train.gradient_checkpointing). The model: SmolLM2-135M's shape (Llama,
   30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads, vocabulary 49,152; random weights: memory
   and speed do not depend on them) with kd's LoRA (rank 16 on every projection), float32, sdpa
   attention; one sequence of 512 prompt tokens and C completion tokens, C in 1k, 4k, 8k. Each case
   runs in a fresh process: the student loaded as kd's train stage loads it (kd.stages.policy.Policy),
   the peak-RSS window reset (/proc/self/clear_refs), then one forward + backward of kd's objective
   in training mode, as DistillTrainer.compute_loss runs it, with or without checkpointing (enabled
   as Trainer enables it). "Peak above the model" is the window's VmHWM minus the RSS before the step,
   measured with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_): every tensor then
   gets pages of its own that go back when it is freed, so RSS follows the live tensors, the figure a
   GPU's torch.cuda.max_memory_allocated reports (checked against torch.profiler's memory timeline:
   the same to 0.01 GiB). With glibc's default, freed blocks stay in its heap and the peak read 2-2.5x
   higher with checkpointing. Tokens/s comes from a second fresh process with the default allocator.
2. Padding-free micro-batches (train.micro_batch_tokens). The same model at 8 layers (the ratio of
   padded to packed work does not depend on depth); 32 sequences in micro-batches of 8, padded to the
   longest, against the same 32 packed into rows of at most 4,096 or 1,024 tokens (sdpa with packed
   rows computes attention over the whole row and masks it, so shorter rows waste less; FlashAttention's
   varlen kernel computes each sequence alone); one forward + backward of
   each micro-batch or row. Lengths: the real world's (HumanEval prompts in SmolLM2's chat template,
   as `kd real` builds them, with completions drawn from 16 to 128 tokens, the real config's limit) and
   a long-tailed one (prompts log-uniform from 50 to 2,000 tokens, completions from 16 to 512).
Writes bench/results/scale.json and scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL_DIR = ROOT / "runs" / "bench-scale" / "smollm2-shape"
PROMPT = 512
COMPLETIONS = (1024, 4096, 8192)
PACKING_LAYERS = 8
SEQUENCES, BATCH = 32, 8
PACKING = {"padded": 0, "packed 4096": 4096, "packed 1024": 1024}  # micro-batch -> train.micro_batch_tokens


def rss_gib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 2**20 for line in status if line.startswith(field + ":"))


def build_model(layers: int) -> Path:
    """SmolLM2-135M's architecture with random weights, saved once (tokenizer-free: kd's Policy needs none)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = MODEL_DIR.with_name(f"{MODEL_DIR.name}-{layers}")
    if (target / "config.json").is_file():
        return target
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=16384, rms_norm_eps=1e-5, rope_theta=100000.0)
    LlamaForCausalLM(config).save_pretrained(target)
    return target


def policy_for(model: Path, **train):
    from kd.stages import config as config_lib
    from kd.stages.policy import Policy

    data: dict = {}
    for key, value in {"student": str(model), "teacher": str(model), "train.precision": "float32", **train}.items():
        config_lib.apply_override(data, f"{key}={value}")
    config = config_lib.build(config_lib.Config, data, where="")
    return Policy(config), config


def example(prompt: int, completion: int, rng) -> dict:
    noise = (rng.standard_normal(completion) * 0.1 - 2).astype(np.float32)
    return {"input_ids": rng.integers(3, 49152, prompt + completion), "prompt_length": prompt,
            "sampler_logprobs": noise, "policy_logprobs": noise, "teacher_logprobs": noise - 0.5,
            "advantages": np.full(completion, -0.5, np.float32)}


def backward(policy, config, batch, normaliser) -> None:
    from kd.stages import objective

    result = objective.step_loss(policy.model, policy.head, batch, config.train, normaliser, 1)
    result.loss.backward()


def checkpointing_case(completion: int, checkpointing: bool, layers: int = 30) -> dict:
    """One train step on one sequence; memory and time of the step alone (the model is loaded before)."""
    import torch

    from kd.stages.train import Collator

    policy, config = policy_for(build_model(layers))
    policy.model.train()
    if checkpointing:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # A short step first: one-time allocations (kernel workspaces, autograd's buffers) are not per token.
    backward(policy, config, Collator(0)([example(64, 64, np.random.default_rng(1))]), torch.tensor(64))
    batch = Collator(0)([example(PROMPT, completion, np.random.default_rng(0))])
    before = rss_gib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    started = time.perf_counter()
    backward(policy, config, batch, torch.tensor(completion))
    seconds = time.perf_counter() - started
    return {"peak_above_model_gib": rss_gib("VmHWM") - before, "seconds": seconds,
            "tokens_per_second": (PROMPT + completion) / seconds}


def lengths(kind: str) -> list[tuple[int, int]]:
    rng = np.random.default_rng(0)
    if kind == "long-tailed":
        prompts = np.exp(rng.uniform(np.log(50), np.log(2000), SEQUENCES)).astype(int)
        completions = np.exp(rng.uniform(np.log(16), np.log(512), SEQUENCES)).astype(int)
        return list(zip(prompts.tolist(), completions.tolist()))
    return [(prompt, int(rng.integers(16, 129))) for prompt in real_prompt_lengths(rng)]


def real_prompt_lengths(rng) -> list[int]:
    """Token counts of SEQUENCES HumanEval prompts as the real world's student sees them: a chat turn in
    SmolLM2-135M-Instruct's template (the tokenizer of `kd real`'s world; built if missing)."""
    import yaml

    from kd.stages import prompts
    from kd.stages.session import load_tokenizer

    config = yaml.safe_load((ROOT / "configs" / "smollm2-humaneval.yaml").read_text())
    world = ROOT / config.get("real_dir", "runs/real-world")
    if not (world / "student" / "config.json").is_file():
        subprocess.run(["kd", "real", "-c", str(ROOT / "configs" / "smollm2-humaneval.yaml")], check=True, cwd=ROOT)
    tokenizer = load_tokenizer(str(ROOT / config["student"]))
    rows = prompts.load(str(ROOT / config["generate"]["prompts"]), tokenizer, 1 << 16)
    chosen = rng.choice(len(rows), SEQUENCES, replace=False)
    return [len(rows[i].token_ids) for i in chosen]


def packing_case(kind: str, row_tokens: int) -> dict:
    import torch

    from kd.stages.train import Collator, micro_batches

    policy, config = policy_for(build_model(PACKING_LAYERS))
    policy.model.train()
    rng = np.random.default_rng(1)
    rows = [example(prompt, completion, rng) for prompt, completion in lengths(kind)]
    collate = Collator(0, micro_batch_tokens=row_tokens)
    batches = [collate(rows[first : first + BATCH]) for first in range(0, SEQUENCES, BATCH)]
    passes = [micro for batch in batches for micro in micro_batches(batch)]
    real = sum(len(row["input_ids"]) for row in rows)
    computed = sum(micro["input_ids"].numel() for micro in passes)
    normaliser = torch.tensor(sum(int(micro["shift_labels"].ne(-100).sum()) for micro in passes))
    started = time.perf_counter()
    for micro in passes:
        backward(policy, config, micro, normaliser)
    seconds = time.perf_counter() - started
    return {"tokens": real, "computed_positions": computed, "padding_share": 1 - real / computed,
            "forward_passes": len(passes), "seconds": seconds, "tokens_per_second": real / seconds}


# glibc's allocator with a fixed 64 KiB mmap threshold: RSS = live tensors (the module docstring).
TENSOR_RSS = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16)}


def in_fresh_process(*args: str, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, __file__, "--case", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})})
    if done.returncode:
        raise SystemExit(f"case {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", nargs="+")
    parser.add_argument("--completions", type=int, nargs="+", default=list(COMPLETIONS))
    parser.add_argument("--parts", nargs="+", choices=("checkpointing", "packing"), default=["checkpointing", "packing"],
                        help="measure only these; the others' rows are kept from bench/results/scale.json")
    args = parser.parse_args()
    if args.case:
        kind, *rest = args.case
        result = (checkpointing_case(int(rest[0]), rest[1] == "on") if kind == "checkpointing"
                  else packing_case(rest[0], int(rest[1])))
        print(json.dumps(result))
        return
    build_model(30), build_model(PACKING_LAYERS)
    kept = json.loads((RESULTS / "scale.json").read_text()) if (RESULTS / "scale.json").is_file() else {}
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d"),
               **{part: [] if part in args.parts else kept.get(part, []) for part in ("checkpointing", "packing")}}
    for completion in args.completions if "checkpointing" in args.parts else ():
        for mode in ("off", "on"):
            memory = in_fresh_process("checkpointing", str(completion), mode, env=TENSOR_RSS)
            speed = in_fresh_process("checkpointing", str(completion), mode)
            row = {"completion": completion, "checkpointing": mode, "peak_above_model_gib": memory["peak_above_model_gib"],
                   "seconds": speed["seconds"], "tokens_per_second": speed["tokens_per_second"]}
            print(row, flush=True)
            results["checkpointing"].append(row)
    for kind in ("real world", "long-tailed") if "packing" in args.parts else ():
        for mode, row_tokens in PACKING.items():
            row = {"lengths": kind, "micro_batches": mode, **in_fresh_process("packing", kind, str(row_tokens))}
            print(row, flush=True)
            results["packing"].append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "scale.md").write_text(report(results))
    print(report(results))


def report(results: dict) -> str:
    lines = [f"# Fitting a real-size job (bench/scale.py; {results['machine']}, {results['date']})", "",
             "## Activation checkpointing: one train step, SmolLM2-135M's shape (30 layers), 512 prompt tokens", "",
             "| completion tokens | peak above the model, off | on | on / off | tokens/s, off | on | on / off |",
             "|---|---|---|---|---|---|---|"]
    by = {(row["completion"], row["checkpointing"]): row for row in results["checkpointing"]}
    for completion in sorted({row["completion"] for row in results["checkpointing"]}):
        off, on = by[completion, "off"], by[completion, "on"]
        lines.append(f"| {completion} | {off['peak_above_model_gib']:.2f} GiB | {on['peak_above_model_gib']:.2f} GiB | "
                     f"{on['peak_above_model_gib'] / off['peak_above_model_gib']:.2f}x | {off['tokens_per_second']:.0f} | "
                     f"{on['tokens_per_second']:.0f} | {on['tokens_per_second'] / off['tokens_per_second']:.2f}x |")
    lines += ["", "Peak above the model: live tensors during the step (RSS with glibc's mmap threshold fixed at 64 KiB, "
              "so that freed tensors leave RSS; bench/scale.py's docstring). Tokens/s: a second fresh process, default "
              "allocator, one step after a short warm-up step.", "",
              f"## Padding-free micro-batches: {SEQUENCES} sequences, micro-batches of {BATCH} padded vs packed into rows "
              f"of at most N tokens (train.micro_batch_tokens = N), {PACKING_LAYERS} layers, sdpa", "",
              "| lengths | micro-batches | forward passes | padding share | tokens/s | packed / padded |", "|---|---|---|---|---|---|"]
    by = {(row["lengths"], row["micro_batches"]): row for row in results["packing"]}
    for kind in ("real world", "long-tailed"):
        for mode in PACKING:
            row = by[kind, mode]
            ratio = row["tokens_per_second"] / by[kind, "padded"]["tokens_per_second"]
            lines.append(f"| {kind} | {mode} | {row['forward_passes']} | {row['padding_share']:.0%} | "
                         f"{row['tokens_per_second']:.0f} | {ratio:.2f}x |")
    lines += ["", "sdpa (and eager) compute a packed row's attention over the whole row, then mask what crosses "
              "sequences: that work grows with the square of the row, so on them rows about as long as the longer "
              "sequences do best, and rows of many short sequences waste what packing saved. flash_attention_2 (a "
              "GPU with flash-attn) computes each sequence alone."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
