"""Disk per epoch of the real world with and without retention.

    python bench/retention.py [--epochs 3]      (just bench-retention; needs `kd real`)

One `kd loop` of configs/smollm2-humaneval.yaml keeping everything (keep_epochs 0), eval only at the
start and the end; the bytes of each epoch's datasets are counted. Then the same run is retuned with
keep_epochs=1 and keep_adapters_every=2 (retunable fields: the loop has nothing left to compute and
prunes), and its bytes are counted again, with `kd verify`'s verdict on the pruned run. A 135M
student at LoRA rank 16 is small; the per-dataset bytes scale with the adapter's parameters
(train keeps it with its float32 Adam moments) and with rows x completion tokens (rollouts, scored).
Writes bench/results/retention.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CONFIG = ROOT / "configs" / "smollm2-humaneval.yaml"
DATASETS = ("rollouts", "scored", "train", "adapter", "eval")


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def sizes(run_dir: Path) -> dict[str, dict[str, int]]:
    return {epoch.name: {name: size(epoch / name) for name in DATASETS}
            for epoch in sorted(run_dir.glob("[0-9]" * 4))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    run_id = "bench-retention-real"
    loop = ["kd", "loop", "-c", str(CONFIG), "--set", f"run_id={run_id}", "--set", f"epochs={args.epochs}",
            "--set", f"eval.every={args.epochs}"]
    subprocess.run([*loop, "--overwrite"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    run_dir = ROOT / "runs" / run_id
    full = sizes(run_dir)
    subprocess.run([*loop, "--set", "keep_epochs=1", "--set", "keep_adapters_every=2"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    pruned = sizes(run_dir)
    verify = subprocess.run(["kd", "verify", str(run_dir)], cwd=ROOT, capture_output=True, text=True)
    result = {"epochs": args.epochs, "keep_all": full, "keep_epochs_1": pruned,
              "verify": (verify.stdout + verify.stderr).strip(), "verify_exit": verify.returncode}
    lines = [f"# Disk per epoch of the real world ({args.epochs} epochs), bytes", "",
             "`python bench/retention.py`: one run keeping everything, then the same run retuned with "
             "keep_epochs=1, keep_adapters_every=2.", "",
             "| epoch | " + " | ".join(DATASETS) + " | total, keep all | total, keep_epochs 1 |",
             "|---|" + "---|" * (len(DATASETS) + 2)]
    for epoch, row in full.items():
        lines.append(f"| {epoch} | " + " | ".join(f"{row[name] / 2**20:.2f} MiB" for name in DATASETS)
                     + f" | {sum(row.values()) / 2**20:.2f} MiB | {sum(pruned[epoch].values()) / 2**20:.2f} MiB |")
    total_full = sum(sum(row.values()) for row in full.values())
    total_pruned = sum(sum(row.values()) for row in pruned.values())
    lines += ["", f"Whole run: {total_full / 2**20:.1f} MiB keeping all, {total_pruned / 2**20:.1f} MiB with "
              f"keep_epochs 1. `kd verify` after pruning (exit {verify.returncode}): {result['verify'].splitlines()[-1]}"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "retention.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "retention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
