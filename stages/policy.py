"""The policy being trained: the student with a trainable LoRA adapter, kept loaded across a loop's epochs.

The adapter export-lora writes (<epoch>/adapter) is the policy that samples the next epoch
(kd.stages.pipeline.policy_adapter_dir); train/adapter beside the optimiser state is the
checkpoint a later train stage resumes from. Both hold the same weights.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

from kd.stages.config import Config, TrainConfig
from kd.stages.errors import KdError
from kd.stages.models import OutputHead, adapter_misfit, disable_dropout, load_causal_lm, resolve_attention, resolve_dtype

OPTIMIZER = "optimizer.pt"  # in <epoch>/train/: the AdamW state the next epoch resumes


class Policy:
    """The student with a trainable LoRA, built once per process: each epoch puts the previous epoch's
    adapter into the same model, so `kd loop` does not reload the (frozen) base weights for every
    train stage. Epoch 0 gets the seeded fresh LoRA (equal to the base) that `get_peft_model` drew.
    After a train stage has written its output, the model and the optimiser state it saved are that
    output: the next epoch of the same process resumes from memory instead of reading them back."""

    def __init__(self, config: Config):
        from peft import LoraConfig, get_peft_model

        cfg = config.train
        # The frozen base in the training precision (bf16 halves it); PEFT keeps the LoRA weights, and
        # so the optimiser state, in float32 (get_peft_model's autocast_adapter_dtype).
        # Loaded on the CPU: Trainer (or accelerate, one device per process) moves it to its device.
        # FlashAttention runs on a GPU only, and OutputHead checks the head with a forward here: sdpa
        # until that check is done.
        attention = train_attention(cfg)
        base = load_causal_lm(config.student, dtype=base_dtype(cfg), device="cpu",
                              attn_implementation="sdpa" if attention == "flash_attention_2" else attention)
        disable_dropout(base)
        torch.manual_seed(config.seed)  # LoRA A is random: same seed, same initial adapter
        lora = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, lora)
        self.head = OutputHead(self.model)
        if attention != base.config._attn_implementation:
            base.set_attn_implementation(attention)
        # Only the LoRA weights train: walking them, not the whole model, at each save and epoch start.
        self.trainable = {name: weight for name, weight in self.model.named_parameters() if weight.requires_grad}
        self.fresh = {name: tensor.clone() for name, tensor in self.weights().items()}
        self.holds: Path | None = None  # the train/ directory whose adapter the model holds now
        self.optimizer_state: dict | None = None  # and whose optimiser state this is

    def load(self, adapter: Path | None):
        """The model holding `adapter`'s weights (the fresh LoRA at None); one line if it does not fit."""
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        try:
            weights = self.fresh if adapter is None else load_peft_weights(str(adapter), device="cpu")
            result = set_peft_model_state_dict(self.model, weights)
            if result.unexpected_keys:
                raise ValueError(f"unexpected weights {result.unexpected_keys[:3]}")
        except (RuntimeError, ValueError, KeyError, OSError) as err:
            raise adapter_misfit(adapter, err) from None
        self.holds = None
        return self.ready()

    @contextlib.contextmanager
    def holding(self, adapter: Path | None) -> Iterator[None]:
        """The model with `adapter`'s LoRA weights (the fresh LoRA at None) inside the block, its own
        after: the trainer's logprobs of an older policy (max_staleness) without a second model."""
        own = {name: weight.detach().clone() for name, weight in self.trainable.items()}
        holds = self.holds
        try:
            self.load(adapter)
            yield
        finally:
            self.holds = holds
            with torch.no_grad():
                for name, weight in self.trainable.items():
                    weight.copy_(own[name])

    def resume(self, previous: Path | None) -> tuple[object, dict | None]:
        """The model and optimiser state that the complete train/ directory `previous` holds (a fresh
        LoRA and no state at None). Training changes both: until `trained` they hold no directory."""
        if previous is not None and previous == self.holds:
            model = self.ready()
        else:
            model = self.load(None if previous is None else previous / "adapter")
            self.optimizer_state = None if previous is None else torch.load(
                previous / OPTIMIZER, map_location="cpu", weights_only=True
            )
        self.holds = None
        return model, self.optimizer_state

    def ready(self):
        """The model, cleared of what the previous epoch's Trainer left on it."""
        from accelerate.utils import extract_model_from_parallel

        # Under bf16 that Trainer wrapped forward in autocast in place: unwrapped, the wrappers do not
        # pile up epoch after epoch.
        extract_model_from_parallel(self.model, keep_fp32_wrapper=False)
        # accelerate prepares a model once and marks it: still marked, the next Trainer would train it
        # as it is now, without autocast under bf16 and without DDP's gradient all-reduce.
        self.model.__dict__.pop("_is_accelerate_prepared", None)
        for weight in self.trainable.values():
            weight.grad = None
        return self.model

    def weights(self) -> dict[str, torch.Tensor]:
        """The LoRA weights under the names of PEFT's adapter files, without PEFT's "auto" embedding
        check: kd never resizes the vocabulary, and that check reads the base model's config (from the
        Hub for a Hub id) at every save."""
        from peft import get_peft_model_state_dict

        trainable = {name: weight.detach() for name, weight in self.trainable.items()}
        return get_peft_model_state_dict(self.model, state_dict=trainable, save_embedding_layers=False)

    def trained(self, out: Path, optimizer_state: dict) -> None:
        """`out`, now complete on disk, holds the model's adapter and this optimiser state."""
        self.holds, self.optimizer_state = out, optimizer_state

    def offload(self) -> bool:
        """Model and optimiser state to CPU memory if they are on a GPU (True then): an engine about to
        wake there re-takes its whole gpu_memory_utilization. The next train stage's Trainer moves the
        model back, and the optimiser loads its state onto the parameters' device."""
        if self.model.device.type != "cuda":
            return False
        from accelerate.utils import send_to_device

        self.model.to("cpu")
        self.optimizer_state = send_to_device(self.optimizer_state, "cpu")  # None stays None
        return True


def policy_model(config: Config, previous_adapter: Path | None):
    """The student with a trainable LoRA: the previous epoch's adapter, or a fresh one (equal to the base)."""
    return Policy(config).load(previous_adapter)


def train_device(cfg: TrainConfig) -> torch.device:
    """Where this process trains: train.device, or under `accelerate launch` its own GPU (LOCAL_RANK).
    A GPU this process cannot see is refused in one line."""
    if cfg.device == "auto":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    device, visible = torch.device(cfg.device), torch.cuda.device_count()
    if device.type == "cuda" and (not visible or (device.index or 0) >= visible):
        raise KdError(f"config field train.device: {cfg.device}, but {visible} GPUs are visible to this process; "
                      + (f"use cuda:0 .. cuda:{visible - 1}" if visible else "use cpu or auto"))
    return device


def uses_bf16(cfg: TrainConfig) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def base_dtype(cfg: TrainConfig) -> str:
    """The frozen base's dtype in training: bfloat16 under bf16 training, else float32."""
    return "bfloat16" if uses_bf16(cfg) else "float32"


def train_attention(cfg: TrainConfig) -> str:
    """train.attn_implementation resolved for the trained student (kd.stages.models.resolve_attention):
    on train.device, its base weights in `base_dtype`. One line if it cannot run."""
    device = train_device(cfg)
    return resolve_attention(cfg.attn_implementation, device, resolve_dtype(base_dtype(cfg), device))
