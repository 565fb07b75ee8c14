"""Which layers to drop, and whether a run learnt the sums: greedy accuracy on the real world's train
and held-out arithmetic questions of depth-pruned copies of its teacher, or of finished runs' students
with the adapters of some epochs.

    python bench/pruning.py --drop 20,21 10,11 15,25 ... [--world runs/real-world]   (just bench-pruning)
    python bench/pruning.py --world runs/real-world-x --run runs/arith-x ... --adapters base 4 9 [--name NAME]

--drop: for each set of dropped layers, the teacher of `--world` (built by `kd real`) pruned by
kd.stages.tasks.real.pruned ('none': the teacher itself). --run/--adapters: each run's student (its
config.yaml's, which must be `--world`'s) with the PEFT adapter that epoch's export-lora wrote (epoch
e's adapter is the policy that samples at e + 1; 'base': no adapter). Each model answers every
question of prompts/arithmetic-train.jsonl.zst and prompts/arithmetic-heldout.jsonl.zst greedily (up
to eval.max_new_tokens of configs/smollm2-arithmetic.yaml new tokens), checked by the `last-integer`
verifier kd's eval uses. Also reported, on the held-out questions: the mean reply length in tokens,
and the per-token reverse KL(model || teacher) over the full vocabulary on those greedy replies (nats;
the teacher's own is 0). A pruned copy is measured without building a world of it: `kd real` with
`--set real.student_layers=[...]` and its own real_dir builds one. Writes bench/results/<name>.json
and .md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shlex
import time
from pathlib import Path

from curves import save as save_results  # bench/ is on sys.path: run as `python bench/pruning.py`

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "smollm2-arithmetic.yaml"


def reply_mask(replies_B_R, ends):
    """True up to and including each row's first end token (its logprob counts), False after it (the
    padding generate appends once a row has ended). [B, R] -> [B, R] bool."""
    import torch

    ended_B_R = torch.isin(replies_B_R, ends).long()
    return (ended_B_R.cumsum(1) - ended_B_R) == 0


def answer(model, teacher, tokenizer, rows: list[dict], max_new_tokens: int, with_kl: bool) -> dict:
    """`model`'s greedy replies to `rows`: accuracy, and (`with_kl`) mean reply tokens and reverse KL per
    token to `teacher`."""
    import torch

    from kd.stages.tasks import last_integer

    prompts = [tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False) for row in rows]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ends = torch.tensor(teacher.generation_config.eos_token_id)
    with torch.no_grad():
        out_B_L = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=ends.tolist(),
                                 pad_token_id=tokenizer.pad_token_id)
    prompt_len = batch.input_ids.shape[1]
    mask_B_R = reply_mask(out_B_L[:, prompt_len:], ends)
    texts = tokenizer.batch_decode([r[m] for r, m in zip(out_B_L[:, prompt_len:], mask_B_R)], skip_special_tokens=True)
    found = {"accuracy": sum(last_integer(texts, [row["answer"] for row in rows])) / len(rows)}
    if with_kl:
        mask_B_L = torch.cat([batch.attention_mask.bool(), mask_B_R], 1).long()
        # positions from the mask, as generate gave them to the left-padded rows
        positions_B_L = (mask_B_L.cumsum(1) - 1).clamp(min=0)
        keep = mask_B_R.shape[1] + 1  # the head only where a reply token is predicted

        def logprobs(m):
            with torch.no_grad():
                logits = m(out_B_L, attention_mask=mask_B_L, position_ids=positions_B_L, logits_to_keep=keep).logits
            return torch.log_softmax(logits[:, :-1], -1)

        model_lp_B_R_V = logprobs(model)
        teacher_lp_B_R_V = model_lp_B_R_V if model is teacher else logprobs(teacher)
        kl_B_R = (model_lp_B_R_V.exp() * (model_lp_B_R_V - teacher_lp_B_R_V)).sum(-1)
        found |= {"reply_tokens": mask_B_R.sum().item() / len(rows), "reverse_kl": kl_B_R[mask_B_R].mean().item(),
                  "replies": [text.strip() for text in texts[:3]]}
    return found


def models(args, teacher):
    """(label, layers, model) for each --drop set, then each --adapters adapter of each --run."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kd.stages.tasks.real import pruned

    for drop in args.drop:
        keep = [i for i in range(teacher.config.num_hidden_layers) if i not in drop]
        yield f"drop {','.join(map(str, drop))}" if drop else "teacher", len(keep), pruned(teacher, keep) if drop else teacher
    for run, epoch in itertools.product(args.run, args.adapters):
        student = AutoModelForCausalLM.from_pretrained(args.world / "student", dtype=torch.float32).eval()
        if epoch != "base":
            student = PeftModel.from_pretrained(student, run / f"{int(epoch):04d}" / "adapter").eval()
        label = f"{run.name} " + ("untrained" if epoch == "base" else f"adapter of epoch {epoch}")
        yield label, student.config.num_hidden_layers, student


def check(parser, args, layers: int) -> None:
    """Every bad option refused before the first model is measured."""
    import yaml

    for spec in args.drop:
        if spec != "none" and not all(part.isdigit() and int(part) < layers for part in spec.split(",")):
            parser.error(f"--drop {spec}: give comma-separated layer indices in [0, {layers - 1}], or none")
    if bool(args.adapters) != bool(args.run):
        parser.error("--run and --adapters go together")
    for epoch in args.adapters:
        if epoch != "base" and not epoch.isdigit():
            parser.error(f"--adapters {epoch}: give epochs (integers) or base")
    for run in args.run:
        student = yaml.safe_load((run / "config.yaml").read_text())["student"] if (run / "config.yaml").exists() else None
        if student is None or (ROOT / student).resolve() != (args.world / "student").resolve():
            parser.error(f"--run {run}: its config.yaml's student is {student}, not {args.world / 'student'}; "
                         "pass the --world it was trained in")
        for epoch in args.adapters:
            if epoch != "base" and not (run / f"{int(epoch):04d}" / "adapter").is_dir():
                parser.error(f"--run {run}: no adapter of epoch {epoch} ({run / f'{int(epoch):04d}' / 'adapter'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=Path("runs/real-world"), help="a world `kd real` built")
    parser.add_argument("--drop", nargs="+", default=[], metavar="I,J,...",
                        help="sets of layers to drop, each comma-separated; 'none' is the teacher")
    parser.add_argument("--run", type=Path, nargs="+", default=[], help="finished runs on --world's student (runs/<id>)")
    parser.add_argument("--adapters", nargs="+", default=[], metavar="E", help="each run's adapters to load ('base': none)")
    parser.add_argument("--name", default="pruning", help="the results files' stem")
    args = parser.parse_args()
    if not args.drop and not args.adapters:
        parser.error("nothing to measure: give --drop, or --run and --adapters")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.stages import config as config_lib
    from kd.stages import datasets_io

    layers = json.loads((args.world / "teacher" / "config.json").read_text())["num_hidden_layers"]
    check(parser, args, layers)
    args.drop = [[] if spec == "none" else sorted(int(i) for i in spec.split(",")) for spec in args.drop]
    max_new_tokens = config_lib.load(CONFIG).eval.max_new_tokens
    tokenizer = AutoTokenizer.from_pretrained(args.world / "teacher", padding_side="left")
    teacher = AutoModelForCausalLM.from_pretrained(args.world / "teacher", dtype=torch.float32).eval()
    splits = {split: datasets_io.read_prompt_rows(args.world / "prompts" / f"arithmetic-{split}.jsonl.zst")
              for split in ("train", "heldout")}
    found = []
    for label, model_layers, model in models(args, teacher):
        start = time.perf_counter()
        train = answer(model, teacher, tokenizer, splits["train"], max_new_tokens, with_kl=False)
        heldout = answer(model, teacher, tokenizer, splits["heldout"], max_new_tokens, with_kl=True)
        found.append({"model": label, "layers": model_layers, "train_accuracy": train["accuracy"], **heldout,
                      "seconds": time.perf_counter() - start})
        print(found[-1], flush=True)

    command = shlex.join(["python", "bench/pruning.py", "--world", str(args.world),
                          *(["--drop", *(",".join(map(str, d)) or "none" for d in args.drop)] if args.drop else []),
                          *(["--run", *map(str, args.run), "--adapters", *args.adapters] if args.adapters else []),
                          *(["--name", args.name] if args.name != "pruning" else [])])
    lines = [
        f"# Greedy accuracy on the real world's sums: {args.name}",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, CPU only. `{command}`: greedy replies (at most"
        f" {max_new_tokens} tokens) to the {len(splits['train'])} train and {len(splits['heldout'])} held-out questions,"
        " checked by last-integer; reply tokens and reverse KL per token (nats) against the teacher on the held-out"
        " replies.",
        "",
        "| model | layers | train accuracy | held-out accuracy | reply tokens | reverse KL | first held-out replies |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in found:
        shown = " / ".join(json.dumps(text)[:60] for text in r["replies"]).replace("|", "\\|")
        lines.append(f"| {r['model']} | {r['layers']} | {r['train_accuracy']:.1%} | {r['accuracy']:.1%}"
                     f" | {r['reply_tokens']:.1f} | {r['reverse_kl']:.3f} | {shown} |")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "command": command,
              "max_new_tokens": max_new_tokens, "found": found}
    save_results(ROOT / "bench" / "results", args.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
