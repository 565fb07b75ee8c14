"""What a finished toy loop's gradient spikes are made of: per-sequence policy gradients at the start
of chosen epochs, and what clipping the per-token log-ratio would do to them.

    python bench/spikes.py --run runs/bench-stability-toy-ratio_cap0off-c1-seed0 --epochs 20 40 52 53 54 55 75 90

For each epoch e the student holds the adapter of epoch e-1 (pi_old; the first optimiser step of an
epoch has r = 1, so its gradient is the policy gradient at pi_old) and each scored sample i of epoch e
gives g_i = grad_theta of -sum_t A_t log pi(y_t) over the LoRA parameters, A_t = q_t - s_t (teacher
minus behaviour logprob: the sampled-token objective at kl_coef 1, the toy default until 2026-12-07,
and the only one this takes apart; the trainer uses its recomputed o_t for s_t, which differs from
the sampler's by under 1e-6 nats on the toy). Reported per epoch:
- the per-token log-ratios q_t - s_t: quantiles, the share of tokens below -5 nats and their share of
  the epoch's reverse KL;
- ||g_i||: median and maximum, and the samples with the largest (their most negative A_t, the
  student's logprob s_t of that token, and how many identical samples of the same prompt the epoch holds);
- the gradient norm of a train.batch_size-sample batch, ||sum_batch g_i|| / tokens (what Trainer
  logs as grad_norm before clipping), over 20 random orders of the epoch's samples, with A_t
  clipped to [-c, c] for each --clips c (0: as trained), and, unclipped, its median over the
  run's median logged grad_norm (metrics.jsonl).
Runs on the CPU; a few seconds per epoch of the toy. Writes bench/results/spikes.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from kd.stages import config as config_lib, datasets_io, models
from kd.stages.rundir import read_metrics
from kd.stages.train import ragged

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DRAWS = 20  # random orders of the epoch's samples, each cut into batches


def epoch_anatomy(base, run: Path, epoch: int, clips: list[float], batch: int) -> dict:
    """One epoch's statistics (module docstring), from its scored dataset and the adapter of epoch - 1."""
    scored = run / f"{epoch:04d}" / "scored"
    table = datasets_io.read_table(scored, datasets_io.kind_of(scored))
    model = models.load_adapter(copy.deepcopy(base), run / f"{epoch - 1:04d}" / "adapter", is_trainable=True)
    model.eval()
    head = models.OutputHead(model)
    params = [p for p in model.parameters() if p.requires_grad]
    prompts, completions = ragged(table, "prompt_token_ids"), ragged(table, "completion_token_ids")
    sampler, teacher = ragged(table, "sampler_logprobs"), ragged(table, "teacher_logprobs")
    grads: dict[float, list[torch.Tensor]] = {c: [] for c in clips}
    samples = []
    for prompt, completion, s, q in zip(prompts, completions, sampler, teacher):
        if not len(completion):  # no token to train on: Trainer skips it too (kd.stages.train.features)
            continue
        ids = torch.from_numpy(np.concatenate([prompt, completion]))[None]
        hidden = models.hidden_states(model, ids, None)[0, len(prompt) - 1 : -1]
        logprobs = torch.log_softmax(head(hidden), -1).gather(-1, torch.from_numpy(completion)[:, None])[:, 0]
        log_ratio = q - s
        for k, c in enumerate(clips):
            advantage = torch.from_numpy(np.clip(log_ratio, -c, c) if c else log_ratio)
            found = torch.autograd.grad(-(advantage * logprobs).sum(), params, retain_graph=k < len(clips) - 1)
            grads[c].append(torch.cat([g.flatten() for g in found]))
        worst = int(np.argmin(log_ratio))
        samples.append({"tokens": len(completion), "min_log_ratio": float(log_ratio[worst]),
                        "student_logprob_there": float(s[worst]), "key": (prompt.tobytes(), completion.tobytes())})
    norms = torch.stack(grads[0.0]).norm(dim=1).numpy()
    tokens = np.array([s["tokens"] for s in samples])
    rng = np.random.default_rng(epoch)
    batches = [order[at : at + batch] for order in (rng.permutation(len(samples)) for _ in range(DRAWS))
              for at in range(0, len(samples) - batch + 1, batch)]
    batch_norms = {c: [float(torch.stack([grads[c][i] for i in members]).sum(0).norm() / tokens[members].sum())
                       for members in batches] for c in clips}
    ratios = np.concatenate([q - s for s, q in zip(sampler, teacher) if len(s)])
    copies = Counter(sample["key"] for sample in samples)
    top = []
    for i in np.argsort(-norms)[:3]:
        top.append({"grad_norm": float(norms[i]), **{k: v for k, v in samples[i].items() if k != "key"},
                    "identical_samples": copies[samples[i]["key"]]})
    return {
        "epoch": epoch, "tokens": int(tokens.sum()),
        "log_ratio_quantiles": {str(p): float(np.quantile(ratios, p)) for p in (0.001, 0.01, 0.05, 0.5, 0.95, 0.99)},
        "share_below_minus_5": float((ratios < -5).mean()),
        "kl_share_below_minus_5": float(-ratios[ratios < -5].sum() / -ratios.sum()),
        "sample_grad_norm_p50": float(np.median(norms)), "sample_grad_norm_max": float(norms.max()), "top": top,
        "batch_grad_norm_p50": {str(c): float(np.median(v)) for c, v in batch_norms.items()},
        "batch_grad_norm_max": {str(c): float(max(v)) for c, v in batch_norms.items()},
    }


def markdown(result: dict) -> str:
    clips = [str(c) for c in result["clips"]]
    overall = {c: float(np.median([e["batch_grad_norm_p50"][c] for e in result["epochs"]])) for c in clips}
    run_median = result["run_median_grad_norm"]
    lines = [
        f"# Anatomy of the gradient spikes: {result['run']}", "",
        f"Machine: {result['machine']}. `python bench/spikes.py --run {result['run']} --epochs "
        f"{' '.join(str(e['epoch']) for e in result['epochs'])}`. Per epoch: the policy gradient of each scored sample "
        f"at the epoch's start (A_t = q_t - s_t), and of random {result['batch']}-sample batches (grad_norm as Trainer "
        "logs it, before clipping) with A_t clipped to [-c, c]. 'x run' is the unclipped batches' median over the run's "
        f"median logged grad_norm ({run_median:.3f}); each '(x)' is over the median of the chosen epochs at that c.", "",
        "| epoch | log-ratio p1 / p50 / p99 | tokens < -5 nats | their share of the KL | sample grad p50 / max | x run | "
        + " | ".join(f"batch grad p50 (x), c = {c if c != '0.0' else 'off'}" for c in clips) + " |",
        "|---:|---|---:|---:|---|---:|" + "---|" * len(clips),
    ]
    for e in result["epochs"]:
        q = e["log_ratio_quantiles"]
        lines.append(
            f"| {e['epoch']} | {q['0.01']:.2f} / {q['0.5']:.2f} / {q['0.99']:.2f} | {e['share_below_minus_5']:.1%} | "
            f"{e['kl_share_below_minus_5']:.0%} | {e['sample_grad_norm_p50']:.0f} / {e['sample_grad_norm_max']:.0f} | "
            f"{e['batch_grad_norm_p50']['0.0'] / run_median:.2f}x | "
            + " | ".join(f"{e['batch_grad_norm_p50'][c]:.3f} ({e['batch_grad_norm_p50'][c] / overall[c]:.2f}x)" for c in clips) + " |")
    lines += ["", "The three samples with the largest gradient in each epoch (grad norm; their most negative "
              "log-ratio q_t - s_t and the student's logprob s_t of that token; identical samples of it in the epoch):", ""]
    for e in result["epochs"]:
        lines.append(f"- epoch {e['epoch']}: " + "; ".join(
            f"{t['grad_norm']:.0f} ({t['min_log_ratio']:.1f} at s = {t['student_logprob_there']:.2f}, x{t['identical_samples']})"
            for t in e["top"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished loop of the toy world with the sampled-token objective (runs/<id>)")
    parser.add_argument("--epochs", type=int, nargs="+", required=True, help="epochs >= 1 whose scored data and previous adapter exist")
    parser.add_argument("--clips", type=float, nargs="+", default=[5.0, 3.0, 1.0], help="nats; unclipped (0) always comes first")
    args = parser.parse_args()
    config = config_lib.load(args.run / "config.yaml")
    if (config.train.kl_coef != 1 or config.train.reward_coef or config.train.gamma or config.train.uses_top_k
            or any(teacher.kl_weight != 1 for teacher in config.teachers.values())):
        raise SystemExit(f"{args.run}: trained on another objective than the sampled token alone (kl_coef 1, gamma 0, "
                         "kl_weight 1: the gradients taken apart here); run the loop with bench/toy_before.py's overrides")
    base = models.load_causal_lm(config.student, "float32", "cpu")
    models.disable_dropout(base)
    clips = [0.0, *(c for c in args.clips if c != 0.0)]
    logged = [r["grad_norm"] for r in read_metrics(args.run) if r["stage"] == "train_step" and r.get("grad_norm") is not None]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "run": str(args.run), "clips": clips,
              "batch": config.train.batch_size, "run_median_grad_norm": float(np.median(logged)),
              "epochs": [epoch_anatomy(base, args.run, epoch, clips, config.train.batch_size) for epoch in args.epochs]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "spikes.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "spikes.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
