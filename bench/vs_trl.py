"""kd against TRL's on-policy distiller, head to head: the same student, teacher, LoRA, learning rate
and warm-up, several seeds, and the wall time each needs to reach a series of held-out reverse KLs.

    python bench/vs_trl.py [--epochs 80] [--seeds 0 1 2 3]                  (just bench-vs-trl)
    python bench/vs_trl.py --world real [--epochs 6] [--seeds 0 1]          (just bench-vs-trl-real)
    python bench/vs_trl.py --world real --only topk-forward-packed          (one arm; the others kept)

The toy world (configs/toy.yaml):
- kd: `kd loop` with the teacher's whole next-token distribution (score.top_k = the vocabulary,
  train.topk_reverse_kl 1, train.kl_coef 0), one sample for each of 256 prompts per epoch, 64
  samples per optimiser step (4 steps per epoch): the best toy setting of bench/topk.py.
- TRL: `trl.DistillationTrainer` with beta = 1 (reverse KL over the whole vocabulary), one
  completion for each of 64 prompts per step; a checkpoint every 20 optimiser steps.
The real world (configs/smollm2-humaneval.yaml: SmolLM2-135M-Instruct teaches its 20-layer pruned
copy, HumanEval prompts, up to 128 tokens per completion; `kd real` builds it), one sample for each
of 16 prompts per epoch and one optimiser step per epoch in both kd arms:
- kd, `sampled`: `kd loop` with the config's sampled-token objective.
- kd, `topk-forward-packed`: the teacher's top-16 with the forward KL over them (train.kl_coef 0,
  train.topk_forward_kl 1: the objective that moved the task metric, bench/results/quality-28-topk.md;
  the top-32 reverse KL did worse on this world, bench/results/real.md), micro-batches packed
  into rows of at most 1024 tokens (the fastest row of bench/results/scale.md). The overlapped
  loop is left out: it is no faster overall on two cores (bench/results/overlap-real.md).
- TRL: `trl.DistillationTrainer` with beta = 1, one completion for each of 16 prompts per step (4
  micro-batches of 4, as kd's train.batch_size and grad_accum); a checkpoint every step.
TRL trains for the mean training seconds of the slower kd arm (bench/topk.py's `run_trl`). Training
seconds exclude evaluation (and TRL's checkpointing; kd's adapter export is one of its stages). Afterwards every checkpoint of both tools is
evaluated by `kd.stages.evaluate.evaluate` on all the held-out prompts, on the same draws (the
world's `salts`), which is what the tables and plots show. On the toy both tools also evaluate
while training (those curves are kept in the JSON); on the real world TRL only saves its
checkpoints and kd's loop evaluates only at its first and last epoch (each evaluation costs about
as much as an epoch there). One evaluation differs from the next by sampling noise, so the curves
are averaged over the seeds before anything is read off them.
Writes bench/results/vs_trl.json (the real world: vs_trl-real.json), .md and the curves' PNGs.
`--only ARM ...` runs only those arms (kd arms by key, or `trl`) and takes the others from that JSON,
which must hold them for the same world, epochs, seeds and held-out draws, and (where it records
them) the same settings and config fingerprint; the base student is evaluated first and must give
the held-out numbers the JSON holds, or the evaluation has changed and every arm must run again. A
kept TRL arm that had less training time than the slower kd arm now has is flagged in the results.
Each arm records the date, machine, versions and command it ran with ("measured").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from curves import mean_curve, save as save_results  # bench/ is on sys.path: run as `python bench/vs_trl.py`
from topk import TRL_DISTILLATION, at_time, first_reaching, kd_run_id, run_kd, run_trl, versions
from toy_before import pinned

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TOY_WORLD = ROOT / "runs" / "toy-world" / "toy.json"


@dataclasses.dataclass(frozen=True)
class KdArm:
    key: str                       # --only's name for it
    name: str                      # its name in tables and plots
    settings: tuple[str, ...]      # kd's config overrides; "{vocabulary}" is the toy's vocabulary size


@dataclasses.dataclass(frozen=True)
class World:
    name: str
    config: Path
    build: tuple[str, ...]             # the command that builds the world (skipped by kd once built)
    kd_arms: tuple[KdArm, ...]
    epochs: int                        # --epochs' default
    seeds: tuple[int, ...]             # --seeds' default
    steps_per_checkpoint: int          # optimiser steps between checkpoints, both tools
    # Each evaluation during training draws its own held-out samples (its seeds are salted with the
    # epoch or step), so two curves differ by sampling noise too: every checkpoint of both tools
    # is evaluated again on these same draws.
    salts: tuple[int, ...]
    thresholds: tuple[float, ...]      # held-out KLs whose first-reaching times are tabulated
    times: tuple[float, ...]           # training seconds at which the curves are compared
    evaluate_during: bool              # also evaluate while training (the toy's JSON keeps both curves)
    stem: str                          # results file stem; runs are runs/bench-<stem with - for _>-...
    trl_batch: tuple[int, int] | None  # TRL's prompts per micro-batch and accumulation (None: the config's)

    def kd_overrides(self, arm: KdArm, seed: int) -> list[str]:
        settings = [f"seed={seed}", *pinned(self.config), *arm.settings]
        if any("{vocabulary}" in setting for setting in settings):
            vocabulary = json.loads(TOY_WORLD.read_text())["vocab_size"]
            settings = [setting.format(vocabulary=vocabulary) for setting in settings]
        return settings

    @property
    def prefix(self) -> str:
        return f"bench-{self.stem.replace('_', '-')}-"


REAL = ROOT / "configs" / "smollm2-humaneval.yaml"
WORLDS = {
    "toy": World(
        name="toy", config=ROOT / "configs" / "toy.yaml", build=("kd", "toy"),
        kd_arms=(KdArm("full-reverse", "kd, full-vocabulary reverse KL, 1 sample x 256 prompts per epoch",
                       ("score.top_k={vocabulary}", "train.kl_coef=0", "train.topk_reverse_kl=1", "train.batch_size=64",
                        "generate.prompts_per_epoch=256", "generate.samples_per_prompt=1")),),
        epochs=80, seeds=(0, 1, 2, 3), steps_per_checkpoint=20, salts=(9001, 9002),
        thresholds=(0.2, 0.15, 0.1, 0.07, 0.05), times=(15, 30, 45, 60, 75, 90, 105), evaluate_during=True,
        stem="vs_trl", trl_batch=None),
    "real": World(
        name="real", config=REAL, build=("kd", "real", "--config", str(REAL)),
        kd_arms=(KdArm("sampled", "kd, sampled token, 1 sample x 16 prompts per epoch",
                       ("generate.prompts_per_epoch=16", "generate.samples_per_prompt=1")),
                 KdArm("topk-forward-packed", "kd, top-16 forward KL, packed rows, 1 sample x 16 prompts per epoch",
                       ("generate.prompts_per_epoch=16", "generate.samples_per_prompt=1", "score.top_k=16",
                        "train.kl_coef=0", "train.topk_forward_kl=1", "train.micro_batch_tokens=1024"))),
        epochs=6, seeds=(0, 1), steps_per_checkpoint=1, salts=(9001,),
        thresholds=(1.8, 1.6, 1.4, 1.2, 1.0), times=(60, 120, 180, 240), evaluate_during=False,
        stem="vs_trl-real", trl_batch=(4, 4)),
}


def evaluation_session(world: World):
    """One session (student, teacher, every held-out prompt) for all re-evaluations."""
    from kd.stages import config as config_lib
    from kd.stages.session import Session

    config = config_lib.load(world.config)
    return Session(dataclasses.replace(config, eval=dataclasses.replace(config.eval, num_prompts=0)), progress=False)


def on_common_draws(session, world: World, curve: list[dict], adapters: list[Path | None], cache: dict) -> list[dict]:
    """`curve` with each point's held-out KL and accuracy measured again, on the world's salts.
    `cache` keeps each adapter's numbers (the base student is every curve's first point)."""
    from kd.stages.evaluate import evaluate

    points = []
    for point, adapter in zip(curve, adapters):
        if adapter not in cache:
            stats = [evaluate(session, adapter, salt)[1] for salt in world.salts]
            cache[adapter] = {key: sum(s[key] for s in stats) / len(stats) for key in ("heldout_reverse_kl", "accuracy")}
            cache[adapter]["prompts"] = stats[0]["prompts"]
        points.append({**point, "heldout_reverse_kl": cache[adapter]["heldout_reverse_kl"],
                       "accuracy": cache[adapter]["accuracy"]})
    return points


def kd_adapters(world: World, arm: KdArm, seed: int, curve: list[dict]) -> list[Path | None]:
    """The adapter each evaluated epoch's policy samples with (the base student at epoch 0)."""
    run = ROOT / "runs" / kd_run_id(f"{arm.name} seed {seed}", world.prefix)
    return [None if point["epoch"] == 0 else run / f"{point['epoch'] - 1:04d}" / "adapter" for point in curve]


def aligned(runs: list[list[dict]]) -> list[list[dict]]:
    """TRL's seeds on the checkpoints they all have, then each seed's last: a run stops on the clock,
    so its last checkpoint can fall at a different step in each seed (the kd runs share every epoch)."""
    shared = set.intersection(*({point["steps"] for point in run[:-1]} for run in runs))
    return [[point for point in run[:-1] if point["steps"] in shared] + [run[-1]] for run in runs]


def late_mean(curve: list[dict]) -> float:
    """Mean held-out KL of the evaluations in the last third of the curve's training time."""
    late = [point["heldout_reverse_kl"] for point in curve if point["train_seconds"] >= 2 / 3 * curve[-1]["train_seconds"]]
    return sum(late) / len(late)


def command_line(world: World, epochs: int, seeds: list[int], only: list[str] | None = None) -> str:
    """The command that runs these arms; without `only`, also the command the markdown names for arms
    recorded before each arm kept its own (they ran every arm)."""
    return ("python bench/vs_trl.py" + ("" if world.name == "toy" else f" --world {world.name}")
            + f" --epochs {epochs} --seeds {' '.join(map(str, seeds))}" + (f" --only {' '.join(only)}" if only else ""))


def markdown(result: dict) -> str:
    world = WORLDS[result.get("world", "toy")]
    curves = result["curves"]
    draws = (f"Every checkpoint of every run is evaluated on the same held-out draws ({len(result['common_salts'])} x "
             f"{result.get('heldout_prompts', 256)} samples)")
    if result["training_curves"]:
        during = "; ".join(f"{name} {curve[-1]['heldout_reverse_kl']:.4f}" for name, curve in result["training_curves"].items())
        draws += f"; the evaluations during training, each on draws of its own, ended at: {during}."
    else:
        draws += "; nothing is evaluated during training but kd's first and last epoch (not shown)."
    # Arms kept by --only carry the date, machine, versions and command of the process that ran them.
    default_command = command_line(world, result["epochs"], result["seeds"])
    groups: dict[tuple, dict[str, list[str]]] = {}
    for name in curves:
        m = result.get("measured", {}).get(name) or result
        runs = groups.setdefault((m["date"], m["machine"], tuple(m["versions"].items())), {})
        runs.setdefault(m.get("command", default_command), []).append(name)
    several = sum(len(runs) for runs in groups.values()) > 1
    when = " ".join(f"{date}, {machine}; {', '.join(f'{k} {v}' for k, v in versions)}. "
                    + " ".join(f"`{run}`" + (f" ({'; '.join(names)})." if several else ".") for run, names in runs.items())
                    for (date, machine, versions), runs in groups.items())
    lines = [
        f"# kd vs TRL DistillationTrainer, head to head ({world.name} world)",
        "",
        f"{when} Curves are means over the seeds; "
        f"training seconds exclude evaluation. {draws}",
        "",
        *(line for warning in result.get("warnings", []) for line in (f"**Warning:** {warning}.", "")),
        "| run | training s | optimiser steps | final held-out KL (each seed) | final accuracy |",
        "|---|---:|---:|---|---:|",
    ]
    for name, curve in curves.items():
        each = ", ".join(f"{c[-1]['heldout_reverse_kl']:.4f}" for c in result["seed_curves"][name])
        lines.append(f"| {name} | {curve[-1]['train_seconds']:.1f} | {curve[-1]['steps']:g} "
                     f"| {curve[-1]['heldout_reverse_kl']:.4f} ({each}) | {curve[-1]['accuracy']:.1%} |")
    lines += ["", "Training seconds until the mean curve first reaches a held-out reverse KL:", "",
              "| held-out KL <= | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
    for threshold in world.thresholds:
        cells = [first_reaching(curve, threshold) for curve in curves.values()]
        lines.append(f"| {threshold} | " + " | ".join("not reached" if c is None else f"{c:.1f}" for c in cells) + " |")
    trl_curve = curves[TRL_DISTILLATION]
    trl_final, trl_seconds = trl_curve[-1]["heldout_reverse_kl"], trl_curve[-1]["train_seconds"]

    def reached(name: str) -> str:
        seconds = first_reaching(curves[name], trl_final)
        return "never" if seconds is None else f"{seconds:.1f} s ({seconds / trl_seconds:.0%} of TRL's {trl_seconds:.0f} s)"

    lines += ["", f"TRL's final held-out KL, {trl_final:.4f}, is first reached by the mean curves at (the first "
              "checkpoint at or below it): " + "; ".join(f"{name} {reached(name)}" for name in curves) + ".",
              "One evaluation differs from the next by sampling noise, so also the mean held-out KL of the "
              "evaluations in the last third of the training time: "
              + "; ".join(f"{name} {late_mean(curve):.4f}" for name, curve in curves.items()) + "."]
    lines += ["", "Held-out KL / accuracy of the mean curve at equal training time (last evaluation before it):", "",
              "| training s | " + " | ".join(curves) + " |", "|---:|" + "---|" * len(curves)]
    common = min(curve[-1]["train_seconds"] for curve in curves.values())
    for seconds in [s for s in world.times if s < common] + [common]:
        points = [at_time(curve, seconds) for curve in curves.values()]
        lines.append(f"| {seconds:.0f} | " + " | ".join(f"{p['heldout_reverse_kl']:.3f} / {p['accuracy']:.0%}" for p in points) + " |")
    return "\n".join(lines) + "\n"


def arm_settings(world: World) -> dict[str, tuple[str, list[str]]]:
    """Each arm's name -> (its --only key, what defines it: kd's overrides, TRL's batch)."""
    return {**{arm.name: (arm.key, list(arm.settings)) for arm in world.kd_arms},
            TRL_DISTILLATION: ("trl", [f"batch={world.trl_batch}"])}


def definitions(world: World, epochs: int, seed: int) -> dict[str, dict]:
    """What each arm's results depend on, recorded with them and compared by --only: its settings and
    the fingerprint of the config it runs (kd.stages.config.Config.fingerprint; the first seed's)."""
    from kd.stages import config as config_lib

    kd_configs = {arm.name: [*world.kd_overrides(arm, seed), f"epochs={epochs}"] for arm in world.kd_arms}
    trl_config = [f"seed={seed}", *pinned(world.config)]
    return {name: {"settings": settings,
                   "config_fingerprint": config_lib.load(world.config, kd_configs.get(name, trl_config)).fingerprint()}
            for name, (_, settings) in arm_settings(world).items()}


def previous_arms(world: World, epochs: int, seeds: list[int], keep: list[str]) -> dict:
    """The world's results JSON, for the arms named `keep` (--only): it must hold each of them for
    every seed, run with the same world, epochs, seeds, held-out draws and (where it records them)
    arm settings and config fingerprint."""
    if not keep:
        return {}
    path = RESULTS / f"{world.stem}.json"
    keys = {name: key for name, (key, _) in arm_settings(world).items()}
    if not path.exists():
        raise SystemExit(f"{path}: not found; --only keeps the arms {' '.join(keys[n] for n in keep)} from it: "
                         "run them too (add them to --only)")
    previous = json.loads(path.read_text())
    expected = {"world": world.name, "epochs": epochs, "seeds": seeds, "common_salts": list(world.salts)}
    for field, value in expected.items():
        stored = previous.get(field, "toy" if field == "world" else None)
        if stored != value:
            fix = "pass the same --epochs and --seeds" if field in ("epochs", "seeds") else "run every arm (drop --only)"
            raise SystemExit(f"{path}: {field} is {stored!r} there, {value!r} in this run: {fix}")
    now = definitions(world, epochs, seeds[0])
    for name in keep:
        runs = [previous[curves].get(name) for curves in ("seed_curves", "training_seed_curves")]
        if any(r is None or len(r) != len(seeds) for r in runs):
            raise SystemExit(f"{path}: has no complete arm {keys[name]} (a run for each seed): add it to --only")
        for field, value in now[name].items():
            stored = previous.get("measured", {}).get(name, {}).get(field)
            if stored is not None and stored != value:
                raise SystemExit(f"{path}: arm {keys[name]}'s {field} is {stored} there, {value} now: add it to --only")
    return previous


def main() -> None:
    from kd.stages import config as config_lib
    from kd.stages.schedule import steps_per_epoch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=WORLDS, default="toy")
    parser.add_argument("--epochs", type=int, help="kd's epochs (default: " + ", ".join(
        f"{w.name} {w.epochs}" for w in WORLDS.values()) + ")")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: " + "; ".join(
        f"{w.name} {' '.join(map(str, w.seeds))}" for w in WORLDS.values()))
    parser.add_argument("--only", nargs="+", metavar="ARM", help="run only these arms and keep the others' results: "
                        + "; ".join(f"{w.name}: {' '.join(a.key for a in w.kd_arms)} trl" for w in WORLDS.values()))
    options = parser.parse_args()
    world = WORLDS[options.world]
    epochs, seeds = options.epochs or world.epochs, options.seeds or list(world.seeds)
    settings = arm_settings(world)
    keys = [key for key, _ in settings.values()]
    unknown = sorted(set(options.only or ()) - set(keys))
    if unknown:
        parser.error(f"--only: no arm {', '.join(unknown)} in the {world.name} world (arms: {', '.join(keys)})")
    run_arms = [arm for arm in world.kd_arms if not options.only or arm.key in options.only]
    run_trl_arm = not options.only or "trl" in options.only
    kept = [arm.name for arm in world.kd_arms if arm not in run_arms] + ([] if run_trl_arm else [TRL_DISTILLATION])
    subprocess.run(world.build, cwd=ROOT, check=True)  # the toy's arms read its vocabulary size
    previous = previous_arms(world, epochs, seeds, kept)
    cache: dict = {}
    if previous:
        # Kept arms were evaluated in an earlier process: the same evaluation must give the base student
        # (each kept run's first point) the same numbers, or the arms would not compare.
        with evaluation_session(world) as session:
            base = on_common_draws(session, world, [{}], [None], cache)[0]
        for name in kept:
            for seed, run in zip(seeds, previous["seed_curves"][name]):
                where, stored = f"{RESULTS / world.stem}.json: arm {settings[name][0]} seed {seed}", run[0]
                if stored["steps"] != 0:
                    raise SystemExit(f"{where}: its first point is step {stored['steps']}, not the base student: "
                                     "run every arm (drop --only)")
                if any(abs(base[key] - stored[key]) > 1e-4 for key in ("heldout_reverse_kl", "accuracy")):
                    raise SystemExit(
                        f"{where}: the base student's held-out KL / accuracy are {stored['heldout_reverse_kl']:.6f} / "
                        f"{stored['accuracy']:.4f} there and {base['heldout_reverse_kl']:.6f} / {base['accuracy']:.4f} "
                        "now: the evaluation has changed; run every arm (drop --only)")
    seed_curves, adapters = {}, {}
    for arm in run_arms:
        steps = steps_per_epoch(config_lib.load(world.config, world.kd_overrides(arm, seeds[0])))
        if world.steps_per_checkpoint % steps:
            raise SystemExit(f"{world.name}: a checkpoint every {world.steps_per_checkpoint} steps is not a whole "
                             f"number of kd's epochs ({steps} steps each, {arm.key})")
        every = world.steps_per_checkpoint // steps
        seed_curves[arm.name] = []
        for seed in seeds:
            # Without evaluations during training kd's loop evaluates only its first and last epoch; every
            # epoch's adapter is kept and evaluated afterwards with TRL's checkpoints.
            curve = run_kd(f"{arm.name} seed {seed}", world.kd_overrides(arm, seed), epochs,
                           every if world.evaluate_during else epochs, prefix=world.prefix, config=world.config,
                           every_epoch=not world.evaluate_during)
            seed_curves[arm.name].append([{**point, "steps": point["epoch"] * steps} for point in curve
                                          if point["epoch"] % every == 0 or point["epoch"] == epochs])
        adapters[arm.name] = [kd_adapters(world, arm, seed, run) for seed, run in zip(seeds, seed_curves[arm.name])]
    kd_seconds = {arm.name: sum(run[-1]["train_seconds"] for run in runs) / len(runs)
                  for arm in world.kd_arms for runs in [seed_curves.get(arm.name) or previous["seed_curves"][arm.name]]}
    budget = max(kd_seconds.values())
    if run_trl_arm:
        print(f"== {TRL_DISTILLATION}, {budget:.0f} s of training per seed", flush=True)
        trl_adapters = {seed: ROOT / "runs" / f"{world.prefix}trl-seed-{seed}" for seed in seeds}
        trl_runs = []
        for seed, folder in trl_adapters.items():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            trl_runs.append([{("steps" if key == "step" else key): value for key, value in point.items()}
                             for point in run_trl(budget, world.steps_per_checkpoint, seed=seed, adapters=folder,
                                                  config_path=world.config, batch=world.trl_batch,
                                                  evaluate_during=world.evaluate_during)])
        seed_curves[TRL_DISTILLATION] = aligned(trl_runs)
        adapters[TRL_DISTILLATION] = [[None if p["steps"] == 0 else trl_adapters[seed] / f"step-{p['steps']}" for p in run]
                                      for seed, run in zip(seeds, seed_curves[TRL_DISTILLATION])]
    warnings = []
    if not run_trl_arm:
        stored = previous.get("measured", {}).get(TRL_DISTILLATION, {}).get("budget_seconds")
        trained = [run[-1]["train_seconds"] for run in previous["seed_curves"][TRL_DISTILLATION]]
        # run_trl stops after the step that crosses its budget, so its last checkpoint can pass the budget
        trl_budget = stored if stored is not None else sum(trained) / len(trained)
        if budget > 1.01 * trl_budget:
            slowest = settings[max(kd_seconds, key=kd_seconds.get)][0]
            warnings.append(f"the kept TRL arm had {trl_budget:.0f} s of training, less than kd arm {slowest}'s "
                            f"{budget:.0f} s: add trl to --only to give it the slower kd arm's time")
            print(f"warning: {warnings[-1]}", flush=True)
    print(f"== every checkpoint on the same held-out draws (salts {world.salts})", flush=True)
    with evaluation_session(world) as session:
        common_seed_curves = {name: [on_common_draws(session, world, run, arm_adapters, cache)
                                     for run, arm_adapters in zip(runs, adapters[name])]
                              for name, runs in seed_curves.items()}
    # The top level describes this process; "measured" each arm's (a kept arm's is copied over).
    today = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
             "versions": versions()}
    command = command_line(world, epochs, seeds, options.only)
    defined = definitions(world, epochs, seeds[0])
    measured = {name: {**today, "command": command, **defined[name]} for name in seed_curves}
    if run_trl_arm:
        measured[TRL_DISTILLATION]["budget_seconds"] = budget
    for name in kept:
        common_seed_curves[name] = previous["seed_curves"][name]
        seed_curves[name] = previous["training_seed_curves"][name]
        measured[name] = previous.get("measured", {}).get(name) or {key: previous[key] for key in today}
    order = list(settings)
    result = {
        **today, "world": world.name, "epochs": epochs, "seeds": seeds, "common_salts": world.salts,
        "heldout_prompts": cache[None]["prompts"], "measured": {name: measured[name] for name in order},
        "warnings": warnings,
        # "curves" (plotted): on the common draws; "training_curves": as evaluated during training
        "curves": {name: mean_curve(common_seed_curves[name]) for name in order},
        "seed_curves": {name: common_seed_curves[name] for name in order},
        "training_curves": {name: mean_curve(seed_curves[name]) for name in order} if world.evaluate_during else {},
        "training_seed_curves": {name: seed_curves[name] for name in order},
    }
    save_results(RESULTS, world.stem, result, markdown(result))


if __name__ == "__main__":
    main()
