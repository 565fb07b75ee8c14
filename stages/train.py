"""train: one epoch of importance-sampled policy gradient on the student's LoRA adapter.

    kd train --run toy --epoch 3
    accelerate launch --config_file configs/accelerate/cpu-ddp.yaml --num_processes 2 -m kd.cli.main train --run toy --epoch 3

Reads the epoch's scored samples, the adapter of the previous epoch and its optimiser state, and
writes train/: per-step metrics (Arrow), the updated adapter, and the optimiser state and global
step the next epoch resumes from. The objective is `kd.stages.objective` (math in `kd.stages.loss`). Under `kd loop` the
student with its LoRA stays loaded across epochs (`Session.policy`): each epoch resumes the previous
epoch's adapter and optimiser state in it, from memory when this process wrote them, so the
standalone command and the loop train the same weights (tested bit for bit).

Built on transformers' Trainer (a custom `compute_loss` over our dataset), so accelerate (DDP,
DeepSpeed ZeRO-2; FSDP and ZeRO-3 are refused: kd applies the lm_head itself, which they shard),
bf16, gradient accumulation, gradient clipping and logging come from the
ecosystem. The learning-rate schedule spans the whole run: each epoch's Trainer gets a scheduler
offset by the global step, so warmup and decay do not restart every epoch. The loss normaliser is
the completion-token count of the whole effective batch, counted by Trainer across micro-batches
and processes (`num_items_in_batch`), so the result does not depend on how the batch is split;
`train.batch_size` is split over the processes, so the effective batch and the number of optimiser
steps do not depend on how many there are either.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from kd.stages import datasets_io, loss as loss_lib, objective, pipeline, reporters, rundir
from kd.stages.config import Config, TrainConfig
from kd.stages.models import OutputHead
from kd.stages.policy import OPTIMIZER, Policy, train_attention, train_device, uses_bf16
from kd.stages.progress import bar
from kd.stages.schedule import lr_factor, steps_per_epoch
from kd.stages.errors import KdError
from kd.stages.schemas import SCORED, TRAIN_STEPS
from kd.stages.session import Session, using

STATE = "state.json"


def ragged(table: pa.Table, name: str) -> list[np.ndarray]:
    """Each row of a list column as a numpy view of one flat buffer: no Python object per value
    (at K = 272, making one per top-k value took 0.26 s of a 0.95 s toy train stage)."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False, writable=True)[offsets[0] : offsets[-1]]
    return np.split(values, offsets[1:-1] - offsets[0])


def features(table: pa.Table, cfg: TrainConfig, source: Path, top_k: int = 0,
             kl_weights: dict[str, float] | None = None) -> list[dict]:
    """One training example per sample: token ids plus per-target-position logprobs and advantages
    (and the teacher's top-k ids and logprobs, [T, K], when the top-k divergences are on).
    `policy_logprobs` (o_t of kd.stages.loss), `sampling_policy_logprobs` and the off-policy weights start
    as the sampler's and 1; `recompute_old_policy` puts the trainer's own in before the first step. `kl_weights`: each
    teacher's kl_weight by name (config.teachers; absent: 1). The task reward is centred over the
    samples of each prompt in `table` (the whole epoch's scored dataset: all G samples of a prompt)."""
    columns = ["prompt_token_ids", "completion_token_ids", "sampler_logprobs", "teacher_logprobs"]
    if cfg.uses_top_k:
        columns += ["teacher_top_ids", "teacher_top_logprobs"]
    values = {name: ragged(table, name) for name in columns}
    reward_advantages = loss_lib.group_centred(table.column("reward").to_pylist(), table.column("prompt_id").to_pylist(),
                                               cfg.reward_coef)
    teachers = table.column("teacher").to_pylist()
    rows = []
    for index, reward_advantage in enumerate(reward_advantages):
        prompt, completion = values["prompt_token_ids"][index], values["completion_token_ids"][index]
        sampler, teacher = values["sampler_logprobs"][index], values["teacher_logprobs"][index]
        if not (len(completion) == len(sampler) == len(teacher)):
            raise KdError(f"{source}: row {index}: completion, sampler and teacher logprob lengths differ; regenerate it")
        if not (np.isfinite(sampler).all() and np.isfinite(teacher).all()):
            raise KdError(f"{source}: row {index}: non-finite logprob; the sampler or teacher diverged, regenerate it")
        if not len(completion):
            continue
        kl_coef = cfg.kl_coef * (kl_weights or {}).get(teachers[index], 1.0)
        example = {
            "input_ids": np.concatenate([prompt, completion]), "prompt_length": len(prompt),
            "kl_coef": kl_coef, "reward_advantage": reward_advantage,
            "sampler_logprobs": sampler, "policy_logprobs": sampler, "sampling_policy_logprobs": sampler,
            "is_weights": np.ones_like(sampler), "raw_is_weights": np.ones_like(sampler), "teacher_logprobs": teacher,
            "advantages": loss_lib.advantages(sampler, teacher, kl_coef, cfg.gamma, reward_advantage),
        }
        if cfg.uses_top_k:
            top_ids, top_logprobs = values["teacher_top_ids"][index], values["teacher_top_logprobs"][index]
            if not (len(top_ids) == len(top_logprobs) == top_k * len(completion)):
                raise KdError(
                    f"{source}: row {index}: teacher_top_ids / teacher_top_logprobs do not hold top_k = {top_k} "
                    "entries per completion token; re-run `kd score`"
                )
            example["teacher_top_ids"] = top_ids.reshape(len(completion), top_k)
            example["teacher_top_logprobs"] = top_logprobs.reshape(len(completion), top_k)
        rows.append(example)
    return rows


def scored_top_k(source: Path, cfg: TrainConfig) -> int:
    """K of the scored dataset; the top-k divergences refuse data scored without top-k."""
    top_k = datasets_io.read_manifest(source)["stats"].get("top_k", 0)
    if cfg.uses_top_k and not top_k:
        raise KdError(
            f"{source}: scored without the teacher's top-k, but train.topk_* > 0; "
            "re-run `kd score` with score.top_k set (e.g. 32)"
        )
    return top_k


class Collator:
    """Collates the examples of one micro-batch of Trainer (batch_size sequences per process).

    micro_batch_tokens = 0: one right-padded [B, L] batch. > 0 (padding-free): {"packs": [...]}, the
    sequences packed into rows of at most micro_batch_tokens tokens (`pack_rows`), each row [1, N]
    with `position_ids` restarting at 0 for each sequence and no attention mask, so that transformers
    masks attention block-diagonally; DistillTrainer.training_step runs one forward and backward per row.
    Per-token tensors are aligned to logits positions 0..L-2 (predicting 1..L-1): a packed sequence's
    first token is a prompt token, never a target, so no position predicts across sequences.
    `labels` / `shift_labels` (-100 off the completion) exist so that Trainer counts the completion
    tokens of the effective batch for the loss normaliser. `sequences`: the examples' indices in the
    order their completion tokens appear in the batch (each row in turn).
    """

    PER_TOKEN = ("sampler_logprobs", "policy_logprobs", "sampling_policy_logprobs", "is_weights", "raw_is_weights",
                 "teacher_logprobs", "advantages")

    def __init__(self, pad_token_id: int, top_k: int = 0, micro_batch_tokens: int = 0):
        self.pad_token_id = pad_token_id
        self.top_k = top_k
        self.micro_batch_tokens = micro_batch_tokens

    def __call__(self, examples: list[dict]) -> dict:
        if not self.micro_batch_tokens:
            lengths = np.array([len(e["input_ids"]) for e in examples])
            batch = self.fill(examples, [(r, 0) for r in range(len(examples))], len(examples), int(lengths.max()))
            batch["attention_mask"] = torch.from_numpy(
                (np.arange(batch["input_ids"].shape[1]) < lengths[:, None]).astype(np.int64))
            batch["sequences"] = torch.arange(len(examples))
            return batch
        packs = []
        for rows in pack_rows([len(e["input_ids"]) for e in examples], self.micro_batch_tokens):
            members = [examples[i] for i in rows]
            lengths = [len(e["input_ids"]) for e in members]
            pack = self.fill(members, [(0, at) for at in np.cumsum([0, *lengths[:-1]])], 1, sum(lengths))
            pack["position_ids"] = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]))[None]
            pack["sequences"] = torch.tensor(rows)
            packs.append(pack)
        # Trainer counts the step's completion tokens from each drawn batch's shift_labels (and wants labels).
        return {"packs": packs, **{name: torch.cat([pack[name] for pack in packs], 1) for name in ("labels", "shift_labels")}}

    def fill(self, examples: list[dict], places: list[tuple[int, int]], rows: int, width: int) -> dict[str, torch.Tensor]:
        """[rows, width] tensors with example i at row places[i][0], from column places[i][1]."""
        # Filled as numpy arrays and handed to torch at the end: a torch slice assignment per row and
        # field cost more than the arrays' contents.
        batch = {"input_ids": np.full((rows, width), self.pad_token_id, dtype=np.int64),
                 "labels": np.full((rows, width), objective.IGNORE, dtype=np.int64)}
        per_token = {name: np.zeros((rows, width - 1), dtype=np.float32) for name in self.PER_TOKEN}
        if self.top_k:
            per_token["teacher_top_ids"] = np.zeros((rows, width - 1, self.top_k), dtype=np.int64)
            per_token["teacher_top_logprobs"] = np.zeros((rows, width - 1, self.top_k), dtype=np.float32)
        for e, (r, at) in zip(examples, places):
            ids, start, end = e["input_ids"], at + e["prompt_length"], at + len(e["input_ids"])
            batch["input_ids"][r, at:end] = ids
            batch["labels"][r, start:end] = ids[e["prompt_length"]:]
            for name, values in per_token.items():
                values[r, start - 1 : end - 1] = e[name]
        batch = {name: torch.from_numpy(values) for name, values in {**batch, **per_token}.items()}
        batch["shift_labels"] = batch["labels"][:, 1:].contiguous()
        return batch


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `capacity` tokens: first-fit decreasing (the
    longest sequence first, each into the first row with room; a sequence longer than `capacity`
    gets a row of its own). Deterministic: ties keep their order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([index])
            room.append(capacity - lengths[index])
        else:
            rows[row].append(index)
            room[row] -= lengths[index]
    return rows


def micro_batches(batch: dict) -> list[dict]:
    """The forward passes of a collated batch: its packed rows, or the padded batch itself."""
    return batch["packs"] if "packs" in batch else [batch]


def world_size() -> int:
    """Processes of this training (accelerate launch / torchrun set WORLD_SIZE), known before Trainer starts them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_process_batch(cfg: TrainConfig, processes: int) -> int:
    """Each process's share of a micro-batch: the effective batch (batch_size x grad_accum) does not
    change with the number of processes, so neither do the results nor the learning-rate schedule."""
    if cfg.batch_size % processes:
        raise KdError(
            f"config field train.batch_size: {cfg.batch_size} sequences do not split over {processes} processes; "
            f"use a multiple of {processes}"
        )
    return cfg.batch_size // processes


def make_trainer(config: Config, policy: "Policy", model, examples: list[dict], output_dir: Path, epoch: int,
                 global_step: int, optimizer_state: dict | None, publish: Callable[[dict], None], top_k: int = 0,
                 staleness: int = 0):
    """A DistillTrainer for one epoch; `publish` gets each optimiser step's row as it is taken (main process)."""
    cfg = config.train
    use_bf16 = uses_bf16(cfg)
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=per_process_batch(cfg, world_size()),
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.passes,
        max_grad_norm=cfg.max_grad_norm, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        # Every optimiser step is a row of the train dataset (StepRecorder logs at each); train.logging_steps
        # thins only the lines of metrics.jsonl and config.report_to, so it changes nothing a run writes;
        # kd.stages.reporters, not Trainer's integrations, sends them (report_to=[] here).
        logging_steps=1, save_strategy="no", report_to=[], seed=config.seed + epoch,
        remove_unused_columns=False, bf16=use_bf16, use_cpu=train_device(cfg).type == "cpu",
        # Trainer's bar and log lines: off; the bar is kd's (train.run), the rows go to metrics.jsonl as they come.
        dataloader_num_workers=0, disable_tqdm=True, average_tokens_across_devices=True,
        # Non-reentrant: the frozen base's inputs need no requires_grad, and DDP may take unused parameters.
        gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    place_on_one_device(args, cfg)
    total_steps = config.epochs * steps_per_epoch(config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(global_step + step, cfg, total_steps)
    )
    recorder = StepRecorder(global_step, staleness, publish)
    trainer = DistillTrainer(
        model=model, args=args, train_dataset=examples,
        data_collator=Collator(model.config.pad_token_id or 0, top_k, cfg.micro_batch_tokens),
        optimizers=(optimizer, schedule), callbacks=[recorder], train_config=cfg, recorder=recorder, head=policy.head,
    )
    plugin = trainer.accelerator.state.deepspeed_plugin
    if trainer.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3):
        raise KdError(
            "train under FSDP / DeepSpeed ZeRO-3: kd applies the output head outside the model's forward "
            "(completion positions only, a chunk at a time), where a sharded lm_head is not gathered; use DDP "
            "(configs/accelerate/ddp.yaml) or DeepSpeed ZeRO-2 (configs/accelerate/deepspeed-zero2.yaml)"
        )
    if cfg.micro_batch_tokens and plugin is not None:
        raise KdError(
            "config field train.micro_batch_tokens: packed micro-batches take several backward passes per Trainer "
            "micro-batch, which DeepSpeed counts as micro-steps of their own; use DDP (configs/accelerate/ddp.yaml) "
            "or train.micro_batch_tokens 0"
        )
    trainer.remove_callback(PrinterCallback)
    return trainer


def place_on_one_device(args: TrainingArguments, cfg: TrainConfig) -> None:
    """Without `accelerate launch`, train on one device, train.device: Trainer would otherwise take
    cuda:0 and, with several GPUs visible, wrap the model in torch.nn.DataParallel, under which kd's
    output head (applied outside the model's forward) and its hooks would run on one replica's view."""
    if world_size() > 1:
        if cfg.device != "auto":
            raise KdError(f"config field train.device: {cfg.device} under `accelerate launch` ({world_size()} processes), "
                          "which gives each process its own GPU; leave train.device auto")
        return
    device = train_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        args.__dict__["_setup_devices"] = device  # TrainingArguments.device (a cached property) says cuda:0
    args._n_gpu = 1 if device.type == "cuda" else 0  # never DataParallel


class StepRecorder(TrainerCallback):
    """Collects one metrics row per optimiser step from the loss stats and Trainer's own logs.

    Under several processes each sees only its micro-batches: the sums are all-reduced at each log,
    so the row describes the whole effective batch; the main process `publish`es it at once.
    """

    SUMS = ("tokens", "kl", "entropy", "loss", "mismatch", "ratio", "clipped", "corrected")

    def __init__(self, global_step: int, staleness: int, publish: Callable[[dict], None]):
        self.global_step, self.staleness, self.publish = global_step, staleness, publish
        self.sums = dict.fromkeys(self.SUMS, 0.0)
        self.ratio_max = 0.0
        self.weights: list[torch.Tensor] = []
        self.rows: list[dict] = []

    def add(self, result: objective.StepLoss) -> None:
        stats = result.stats
        for name, value in zip(self.SUMS, (stats.tokens, result.kl_sum, result.entropy_sum, result.batch_share,
                                           result.mismatch_sum, stats.ratio_sum, stats.clipped, result.corrected)):
            self.sums[name] += value
        self.ratio_max = max(self.ratio_max, stats.ratio_max)
        self.weights.append(result.weights_N)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Only the LoRA weights get gradients; walking the whole module tree at every step cost more than the check.
        self.trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for name, parameter in self.trainable:
            if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
                raise KdError(
                    f"train: non-finite gradient of {name} at optimiser step {state.global_step + 1}; "
                    "lower train.learning_rate or check the scored data"
                )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.sums["tokens"] or logs is None or "learning_rate" not in logs:
            return
        sums = torch.tensor([self.sums[name] for name in self.SUMS], dtype=torch.float64)
        ratio_max = torch.tensor([self.ratio_max], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(ratio_max, op=torch.distributed.ReduceOp.MAX)
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, torch.cat(self.weights))
            weights = torch.cat(gathered)
        else:
            weights = torch.cat(self.weights)
        p50, p99, most = np.quantile(weights.numpy(), [0.5, 0.99, 1.0]).tolist()
        total = dict(zip(self.SUMS, sums.tolist()))
        tokens = max(total["tokens"], 1)
        self.rows.append({
            "step": state.global_step, "global_step": self.global_step + state.global_step,
            "loss": total["loss"], "grad_norm": logs.get("grad_norm"), "learning_rate": logs.get("learning_rate"),
            "tokens": int(total["tokens"]), "teacher_kl": total["kl"] / tokens, "mismatch": total["mismatch"] / tokens,
            "entropy": total["entropy"] / tokens, "ratio_mean": total["ratio"] / tokens,
            "ratio_max": float(ratio_max), "clip_fraction": total["clipped"] / tokens,
            "is_weight_p50": p50, "is_weight_p99": p99, "is_weight_max": most,
            "is_corrected_fraction": total["corrected"] / tokens, "staleness": self.staleness,
        })
        if state.is_world_process_zero:
            self.publish(self.rows[-1])
        self.sums = dict.fromkeys(self.SUMS, 0.0)
        self.ratio_max = 0.0
        self.weights = []


class DistillTrainer(Trainer):
    """Trainer whose loss is the importance-sampled policy gradient of `kd.stages.loss` (plus the
    top-k divergences), on the student's logprobs at completion positions only: the model returns
    its last hidden states and `head` (the model's own output head) runs a chunk at a time."""

    def __init__(self, *args, train_config: TrainConfig, recorder: "StepRecorder", head: OutputHead, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_config, self.recorder, self.head = train_config, recorder, head
        # We normalise by num_items_in_batch ourselves; these make Trainer count it and not rescale.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    def floating_point_ops(self, inputs) -> int:
        # Trainer's FLO estimate walks every parameter of the model at every step (1% of a toy train
        # stage) for a `total_flos` that kd neither saves nor reports: throughput is in tokens/s.
        return 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step on a padded micro-batch; on packed rows (train.micro_batch_tokens), Trainer's
        step once per row, gradients all-reduced (DDP) with the last row only."""
        if "packs" not in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        losses = []
        for index, pack in enumerate(inputs["packs"]):
            last = index == len(inputs["packs"]) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                losses.append(super().training_step(model, pack, num_items_in_batch))
        return torch.stack(losses).sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg: TrainConfig = self.train_config
        # The model is in training mode (Trainer's), which activation checkpointing needs; every dropout
        # is off (kd.stages.models.disable_dropout), so at the first step this forward is pi_old, recomputed.
        normaliser = num_items_in_batch if num_items_in_batch is not None else (inputs["shift_labels"] != objective.IGNORE).sum()
        result = objective.step_loss(model, self.head, inputs, cfg, normaliser, self.accelerator.num_processes)
        stats, step = result.stats, self.state.global_step + 1
        if not torch.isfinite(result.loss):
            raise KdError(f"train: non-finite loss at optimiser step {step}; lower train.learning_rate or check the scored data")
        if stats.ratio_max > cfg.max_ratio:
            raise KdError(
                f"train: importance ratio pi_theta / pi_old {stats.ratio_max:.3g} > train.max_ratio {cfg.max_ratio:g} at "
                f"optimiser step {step}; the policy moved that far within the epoch: lower train.learning_rate, set "
                "train.clip_epsilon or ratio_cap, or raise "
                "train.max_ratio (a guard, not part of the run's results: the run resumes with it)"
            )
        # The loss each process adds up to the whole batch's loss: its tokens over all processes' tokens.
        self.recorder.add(result)
        return result.loss


@torch.no_grad()
def trainer_logprobs(trainer: "DistillTrainer", examples: list[dict], cfg: TrainConfig) -> list[np.ndarray]:
    """The T = 1 logprobs of each example's completion tokens under the trainer's model as it is now
    (no gradient, every dropout off); each process computes every example's (the data loader deals
    them out later)."""
    model, collate = trainer.model, trainer.data_collator
    model.eval()
    size = per_process_batch(cfg, world_size())
    found: list[np.ndarray] = [np.empty(0, np.float32)] * len(examples)
    for first in range(0, len(examples), size):
        for batch in micro_batches(collate(examples[first : first + size])):
            # The model's device (DeepSpeed places it only in train()) and the training forward's autocast.
            batch = {name: value.to(model.device) for name, value in batch.items()}
            with trainer.accelerator.autocast():
                picked_N_K, _, _ = objective.student_logprobs(model, trainer.head, batch)
            indices = [first + i for i in batch["sequences"].tolist()]
            counts = [len(examples[i]["teacher_logprobs"]) for i in indices]
            for index, values in zip(indices, np.split(picked_N_K[:, 0].float().cpu().numpy(), np.cumsum(counts)[:-1])):
                found[index] = values
    return found


def recompute_old_policy(trainer: "DistillTrainer", policy: Policy, examples: list[dict], cfg: TrainConfig,
                         sampled_with: Path | None, holds_sampler: bool) -> None:
    """Before the first step: the trainer's own logprobs of the policy it holds (pi_old, o_t of
    kd.stages.loss: the advantages' and the PPO ratio's), of the policy that sampled (b_t: the
    mismatch metric; the same forward when the trainer holds it, `holds_sampler`, else one more with
    `sampled_with`'s adapter in the model), and the off-policy weights pi_old / mu they give."""
    old = trainer_logprobs(trainer, examples, cfg)
    if holds_sampler:
        behaviour = old
    else:
        with policy.holding(sampled_with):
            behaviour = trainer_logprobs(trainer, examples, cfg)
    for example, o, b in zip(examples, old, behaviour):
        example["policy_logprobs"], example["sampling_policy_logprobs"] = o, b
        example["raw_is_weights"], example["is_weights"] = loss_lib.importance_weights(
            o, example["sampler_logprobs"], cfg.is_correction, cfg.is_threshold, cfg.is_level)
        example["advantages"] = loss_lib.advantages(o, example["teacher_logprobs"], example["kl_coef"],
                                                    cfg.gamma, example["reward_advantage"])


def save_adapter(policy: Policy, directory: Path) -> None:
    """The PEFT adapter files (adapter_config.json, adapter_model.safetensors) as `save_pretrained`
    writes them, without its model card: rendering that Jinja template took 7% of a toy train stage,
    and nothing reads it."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    weights = {name: tensor.contiguous() for name, tensor in policy.weights().items()}
    save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora = copy.copy(policy.model.peft_config["default"])
    lora.inference_mode = True  # as save_pretrained records it: a loaded adapter is frozen unless asked otherwise
    lora.save_pretrained(str(directory))


def previous_state(config: Config, epoch: int) -> tuple[Path | None, int]:
    """The previous epoch's complete train/ directory (None at epoch 0) and the global step it reached."""
    if epoch == 0:
        return None, 0
    previous = pipeline.stage_dir(config, epoch - 1, "train")
    manifest = datasets_io.require(previous, TRAIN_STEPS, f"run `kd train --epoch {epoch - 1}` first")
    stepped_for = manifest["config"].get("epochs", config.epochs)
    if stepped_for != config.epochs and config.train.lr_scheduler != "constant":  # kd.stages.rundir.schedule_moved
        raise KdError(
            f"{previous}: trained for a run of {stepped_for} epochs, this config has {config.epochs}; "
            f"train.lr_scheduler {config.train.lr_scheduler} spans the whole run, so keep epochs {stepped_for}"
        )
    return previous, json.loads((previous / STATE).read_text())["global_step"]


def run(config: Config, epoch: int, session: Session | None = None, progress: bool | None = None) -> Path:
    """Write <epoch>/train; each optimiser step's row goes to metrics.jsonl (and config.report_to) as it
    is taken. `progress`: a bar of the optimiser steps (default: the session's, else on)."""
    if progress is None:
        progress = session.progress if session is not None else True
    out = pipeline.stage_dir(config, epoch, "train")
    if datasets_io.is_complete(out):
        return out
    datasets_io.fault_point(out, "start")
    # A GPU this process cannot see, or an attention kernel not installed: one line before anything loads.
    train_attention(config.train)
    started = time.time()
    source = pipeline.stage_dir(config, epoch, "scored")
    table = datasets_io.read_table(source, SCORED, f"run `kd score --epoch {epoch}` first")
    top_k = scored_top_k(source, config.train)
    examples = features(table, config.train, source, top_k,
                        {name: teacher.kl_weight for name, teacher in config.teachers.items()})
    if not examples:
        raise KdError(f"{source}: no sample has a completion token; check generate.max_new_tokens and the prompts")
    previous, global_step = previous_state(config, epoch)
    # The adapter that sampled this epoch's data: with max_staleness s, s epochs older than the one
    # that the trainer starts from (export-lora's of epoch-1, the weights of train/ of epoch-1).
    sampled_with = pipeline.policy_adapter_dir(config, epoch)
    holds_sampler = sampled_with == (pipeline.stage_dir(config, epoch - 1, pipeline.EXPORT_LORA.output) if epoch else None)
    if not holds_sampler:
        rundir.policy_adapter(config, epoch)  # one line if it is gone
    staleness = epoch - min(table.column("policy_version").to_pylist())
    with using(config, session) as own:
        policy = own.policy()
    model, optimizer_state = policy.resume(previous)
    cfg = config.train
    # Trainer's count: the batches of the epoch, grad_accum to an optimiser step, `passes` times over.
    total = cfg.passes * math.ceil(math.ceil(len(examples) / cfg.batch_size) / cfg.grad_accum)
    main = int(os.environ.get("RANK", "0")) == 0
    with tempfile.TemporaryDirectory(prefix="kd-trainer-") as work, \
            bar(f"train epoch {epoch}", total, progress and main) as advance:

        def publish(row: dict) -> None:
            # A re-run of a killed stage logs the steps it redoes again: readers keep the last (rundir.read_metrics).
            if row["global_step"] % cfg.logging_steps == 0:
                rundir.log_metrics(config, {"epoch": epoch, "stage": reporters.TRAIN_STEP, **row})
            advance(1)

        trainer = make_trainer(
            config, policy, model, examples, Path(work), epoch, global_step, optimizer_state, publish,
            top_k if cfg.uses_top_k else 0, staleness,
        )
        recompute_old_policy(trainer, policy, examples, config.train, sampled_with, holds_sampler)
        # Trainer.train() begins with accelerate's free_memory(): a full gc.collect(), which scans every
        # object of the process (torch, transformers, a long loop's state) and took as long as two
        # optimiser steps of the toy. Objects that exist before training are not this epoch's garbage:
        # frozen, the collection scans only what training makes.
        gc.freeze()
        try:
            trainer.train()
        finally:
            gc.unfreeze()
    steps = trainer.recorder.rows
    final_step = global_step + trainer.state.global_step
    final_optimizer_state = trainer.optimizer.state_dict()

    def write_files(tmp: Path) -> None:
        if trainer.is_world_process_zero():
            save_adapter(policy, tmp / "adapter")
            datasets_io.fault_point(out, "checkpoint")
            torch.save(final_optimizer_state, tmp / OPTIMIZER)
            (tmp / STATE).write_text(json.dumps({"global_step": final_step, "epoch": epoch}))

    stats = {
        "steps": len(steps), "global_step": final_step,
        "tokens": int(sum(s["tokens"] for s in steps)),
        "teacher_kl": float(np.mean([s["teacher_kl"] for s in steps])),
        "mismatch": float(np.mean([s["mismatch"] for s in steps])), "entropy": float(np.mean([s["entropy"] for s in steps])),
        "is_corrected_fraction": float(np.mean([s["is_corrected_fraction"] for s in steps])),
        "is_weight_max": float(max(s["is_weight_max"] for s in steps)), "staleness": staleness,
        "ratio_mean": float(np.mean([s["ratio_mean"] for s in steps])),
        "ratio_max": float(max(s["ratio_max"] for s in steps)),
        "clip_fraction": float(np.mean([s["clip_fraction"] for s in steps])),
        "grad_norm": float(np.mean([s["grad_norm"] or 0.0 for s in steps])),
        "learning_rate": steps[-1]["learning_rate"],
    }
    stats["tokens_per_second"] = stats["tokens"] * config.train.passes / max(time.time() - started, 1e-9)
    inputs = [source] + ([previous] if previous is not None else [])
    stage_config = {"seed": config.seed, "student": config.student, "epochs": config.epochs, "train": config.to_dict()["train"]}
    if trainer.is_world_process_zero():
        table = pa.Table.from_pylist(steps, schema=TRAIN_STEPS.schema)
        datasets_io.write_dataset(out, TRAIN_STEPS, table, stage_config, inputs, stats, started, write_files)
        rundir.log_metrics(config, {"epoch": epoch, "stage": pipeline.TRAIN.command, "wall_seconds": time.time() - started,
                                    **stats})
    trainer.accelerator.wait_for_everyone()
    policy.trained(out, final_optimizer_state)
    return out
