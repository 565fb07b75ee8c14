"""Greedy replies of finished runs, by phrasing and by question: what a gap in task accuracy is made of.

    python bench/answers.py RUN_DIR... [--epoch E] [--phrasing P]... [--first-tokens MODEL_DIR] [--name answers]

Each RUN_DIR holds kd eval datasets (<epoch:04d>/eval): a `kd loop` run, or what bench/quality.py
keeps of its off-policy arms and its baselines (runs/bench-<name>-off-policy-seed<s>,
-off-policy-verified-seed<s>, -teacher, -student). Runs whose names differ only in a trailing
-seed<N> form one group, in the order given, named without the prefix all runs share.
Each run's last evaluation is read (--epoch: that one instead). Phrasing: the greedy reply up to its
last integer with every integer written N ("N + N = N", "The sum of N and N is N"), the form the
`last-integer` verifier reads. Writes bench/results/<name>.md: each group's greedy accuracy by
phrasing, and per held-out question how many of its runs are right (a one-run group: its reply) and,
per --phrasing P, how many of its replies take P. --first-tokens adds, per question, the two most
likely first reply tokens of a model (a transformers directory, e.g. the teacher) on the prompt the
runs were evaluated on; without it no model is loaded.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
INTEGER = re.compile(r"-?\d+")
SHOWN = 40  # characters of a phrasing or reply in the tables


def phrasing(reply: str) -> str:
    """`reply` up to its last integer, integers as N, whitespace collapsed; "(no integer)" if it has none."""
    ends = [match.end() for match in INTEGER.finditer(reply)]
    if not ends:
        return "(no integer)"
    return " ".join(INTEGER.sub("N", reply[: ends[-1]]).split())


def shorten(text: str) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"


def greedy_rows(run: Path, epoch: int | None) -> tuple[int, list[dict]]:
    """The epoch read and the greedy rows (prompt_id, prompt_token_ids, answer, completion_text, reward)
    of `run`'s eval."""
    from kd.stages import datasets_io
    from kd.stages.schemas import EVAL

    done = sorted(int(path.parent.name) for path in run.glob("[0-9][0-9][0-9][0-9]/eval") if datasets_io.is_complete(path))
    if not done:
        raise SystemExit(f"{run}: no complete eval dataset (<epoch:04d>/eval); pass a run that kd loop or "
                         "bench/quality.py evaluated")
    chosen = done[-1] if epoch is None else epoch
    if chosen not in done:
        raise SystemExit(f"{run}: no complete eval at epoch {epoch} (evaluated: {', '.join(map(str, done))}); "
                         "pass one of those to --epoch")
    table = datasets_io.read_table(run / f"{chosen:04d}" / "eval", EVAL)
    columns = ["prompt_id", "prompt_token_ids", "answer", "completion_text", "reward", "decoding"]
    rows = [row for row in table.select(columns).to_pylist() if row["decoding"] == "greedy"]
    if not rows:
        raise SystemExit(f"{run / f'{chosen:04d}' / 'eval'}: no greedy replies (only prompts with an `answer` get "
                         "one); evaluate on prompts that carry answers")
    return chosen, rows


def first_tokens(model_dir: Path, prompts: dict[str, list[int]]) -> dict[str, str]:
    """Per prompt id: the two most likely next tokens of the causal LM in `model_dir` after the prompt's
    token ids, with their probabilities ("'The' 0.14, '6' 0.08")."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    found = {}
    with torch.no_grad():
        for prompt_id, ids in prompts.items():
            top = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1).topk(2)
            found[prompt_id] = ", ".join(f"{tokenizer.decode([int(token)])!r} {float(p):.2f}"
                                         for p, token in zip(top.values, top.indices))
    return found


def markdown(groups: dict[str, dict[str, list[dict]]], epochs: dict[str, int], command: str,
             marked: list[str], opening: tuple[str, dict[str, str]] | None) -> str:
    by_epoch = defaultdict(list)
    for run, epoch in epochs.items():
        by_epoch[epoch].append(run)
    read = "; ".join(f"{epoch} ({', '.join(runs)})" for epoch, runs in by_epoch.items())
    lines = [
        "# Greedy replies by phrasing and by question",
        "",
        f"{time.strftime('%Y-%m-%d')}. `{command}`. Read: each run's evaluation at epoch "
        f"{read}. Phrasing: the greedy reply up to "
        "its last integer, integers written N; a phrasing under 5% of a group's replies is counted in "
        "\"other phrasings\".",
        "",
        "| group (runs) | phrasing | replies | right | accuracy |",
        "|---|---|---:|---:|---:|",
    ]
    for group, runs in groups.items():
        rows = [row for run_rows in runs.values() for row in run_rows]
        replies, right = Counter(), Counter()
        for row in rows:
            replies[row["phrasing"]] += 1
            right[row["phrasing"]] += row["reward"]
        common = [form for form, count in replies.most_common() if count >= 0.05 * len(rows)]
        other = [form for form in replies if form not in common]
        label = f"{group} ({len(runs)})"
        for form, forms in [*((f"`{shorten(form)}`", [form]) for form in common), ("other phrasings", other)]:
            count, hits = sum(replies[f] for f in forms), sum(right[f] for f in forms)
            if count:
                lines.append(f"| {label} | {form} | {count} | {hits:.0f} | {hits / count:.1%} |")
                label = ""
        lines.append(f"| | all | {len(rows)} | {sum(right.values()):.0f} | {sum(right.values()) / len(rows):.1%} |")
    questions = list(dict.fromkeys(row["prompt_id"] for runs in groups.values() for rows in runs.values() for row in rows))
    answers = {row["prompt_id"]: row["answer"] for runs in groups.values() for rows in runs.values() for row in rows}
    counted = "".join(f"; then how many of its replies take `{form}`" for form in marked)
    extra = [f"first token of {opening[0]}"] if opening else []
    lines += ["", f"Per held-out question: runs right (a one-run group: ✓ or ✗ and its reply){counted}.", "",
              f"| question | answer | {' | '.join([*extra, *groups])} |", f"|---|---:|{'---|' * (len(extra) + len(groups))}"]
    for question in questions:
        cells = [opening[1][question]] if opening else []
        for runs in groups.values():
            found = [row for rows in runs.values() for row in rows if row["prompt_id"] == question]
            if len(runs) == 1 and found:
                cells.append(f"{'✓' if found[0]['reward'] else '✗'} {shorten(found[0]['completion_text'])}")
            else:
                cells.append(f"{sum(row['reward'] for row in found):.0f}/{len(found)}"
                             + "".join(f"; {sum(row['phrasing'] == form for row in found)}" for form in marked))
        lines.append(f"| {question} | {answers[question]} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--epoch", type=int, help="read this epoch's evaluation of every run (default: each run's last)")
    parser.add_argument("--phrasing", action="append", default=[], metavar="P",
                        help='count, per question, the replies of this phrasing (e.g. "The sum of N and N is N"; repeatable)')
    parser.add_argument("--first-tokens", type=Path, metavar="MODEL_DIR",
                        help="add each question's two most likely first reply tokens under this model (e.g. the teacher)")
    parser.add_argument("--name", default="answers", help="the results file's stem (bench/results/<name>.md)")
    options = parser.parse_args()
    names = [run.resolve().name for run in options.runs]
    if len(set(names)) < len(names):
        parser.error(f"a run is given twice ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); give each once")
    arms = [re.sub(r"-seed\d+$", "", name) for name in names]
    # Runs of one experiment share a long prefix (bench-<name>-); the tables' columns are narrower without it.
    shared = os.path.commonprefix(arms) if len(set(arms)) > 1 else ""
    shared = shared[: shared.rfind("-") + 1]
    groups: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    epochs = {}
    for run, name, arm in zip(options.runs, names, arms):
        epochs[name], rows = greedy_rows(run.resolve(), options.epoch)
        groups[arm[len(shared):]][name] = [{**row, "phrasing": phrasing(row["completion_text"])} for row in rows]
    opening = None
    if options.first_tokens is not None:
        prompts = {row["prompt_id"]: row["prompt_token_ids"] for runs in groups.values() for rows in runs.values() for row in rows}
        opening = (options.first_tokens.name, first_tokens(options.first_tokens, prompts))
    command = " ".join(["python bench/answers.py", *(str(run) for run in options.runs),
                        *(["--epoch", str(options.epoch)] if options.epoch is not None else []),
                        *(f"--phrasing {shlex.quote(form)}" for form in options.phrasing),
                        *([f"--first-tokens {options.first_tokens}"] if options.first_tokens is not None else []),
                        *(["--name", options.name] if options.name != "answers" else [])])
    out = RESULTS / f"{options.name}.md"
    out.write_text(markdown(groups, epochs, command, options.phrasing, opening))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
