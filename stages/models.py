"""The student's and teacher's transformers models as the train, export and hf-engine code uses them:
loading (dtype, device, a one-line error for a missing model), LoRA adapters, and the output head
applied to chosen positions only (never a [B, L, V] logits tensor).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd.stages.errors import KdError


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_attention(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """train.attn_implementation -> transformers' `attn_implementation` for a model that runs on
    `device` with weights of `dtype`: auto is flash_attention_2 where the flash-attn package is
    installed and the model runs on a GPU in bf16 or fp16 (FlashAttention's only dtypes), else sdpa;
    flash_attention_2 where it cannot run is refused in one line."""
    import importlib.util

    installed = importlib.util.find_spec("flash_attn") is not None
    runnable = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    if name == "auto":
        return "flash_attention_2" if installed and runnable else "sdpa"
    if name == "flash_attention_2" and not installed:
        raise KdError("config field train.attn_implementation: flash_attention_2 needs the flash-attn package "
                      "(pip install flash-attn) and a CUDA GPU; use auto, sdpa or eager")
    if name == "flash_attention_2" and not runnable:
        raise KdError(f"config field train.attn_implementation: flash_attention_2 runs on a CUDA GPU in bf16 or fp16, "
                      f"not on {device.type} in {str(dtype).removeprefix('torch.')}; use auto, sdpa or eager")
    return name


def load_causal_lm(path: str | Path, dtype: str = "auto", device: str = "auto", attn_implementation: str = "auto"):
    """A transformers causal LM in eval mode with the attention kernel `attn_implementation` (see
    `resolve_attention`); `device` is where it runs (it may be loaded elsewhere and moved later).
    Raises a one-line error for a missing directory."""
    from transformers import AutoModelForCausalLM

    local = Path(path)
    if (str(path).startswith((".", "/")) or local.exists()) and not (local / "config.json").is_file():
        raise KdError(f"{path}: no model here (config.json missing); build the toy world with `kd toy` or fix the path")
    torch_device = pick_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype,
                                                 attn_implementation=resolve_attention(attn_implementation, torch_device, torch_dtype))
    return model.to(torch_device).eval()


def disable_dropout(model) -> None:
    """Every dropout of `model` off for good, in training mode too: dropout modules get p = 0 and the
    rates that attention layers read at call time (`attention_dropout`, kept as attributes and in the
    config) become 0. Training mode is then as deterministic as eval mode, which activation
    checkpointing needs (transformers checkpoints layers only in training mode) and which keeps the
    training forward the sampler's policy (first-step importance ratios 1). TRL's
    `disable_dropout_in_model` sets the modules only; eager and sdpa attention read the rate."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    configs = [model.config, *(getattr(model.config, name, None) for name in ("text_config", "decoder"))]
    for config in (c for c in configs if c is not None and hasattr(c, "to_dict")):
        for name, value in config.to_dict().items():
            if "dropout" in name and isinstance(value, float):
                setattr(config, name, 0.0)


# Logits materialised at once wherever kd applies a model's head itself (64 MiB of float32): 110
# positions at a 151,936-token vocabulary, a toy batch's every position at 300.
HEAD_CHUNK_VALUES = 1 << 24


class OutputHead:
    """hidden states [N, H] -> logits [N, V], as the model's own head computes them: a linear layer,
    then the logit scale (Cohere), the division by `logits_scaling` (Granite) or the final
    soft-capping (Gemma 2) where the model's config asks for it. With it the stages make logits for
    chosen positions, a chunk at a time, never [B, L, V] at once (see kd.stages.loss)."""

    def __init__(self, model):
        self.linear = model.get_output_embeddings()
        if type(self.linear) is not torch.nn.Linear:
            raise KdError(
                f"{model.config.name_or_path}: the output head is a {type(self.linear).__name__}, not a linear layer; "
                "kd applies the head itself (completion positions only), which needs a plain linear head "
                "(a LoRA on lm_head is not supported: leave it out of train.lora_target_modules)"
            )
        self.vocabulary = self.linear.out_features
        self.scale = getattr(model.config, "logit_scale", None)
        self.divisor = getattr(model.config, "logits_scaling", None)
        self.cap = getattr(model.config, "final_logit_softcapping", None)
        self._check(model)

    def __call__(self, hidden_N_H: torch.Tensor) -> torch.Tensor:
        # In the head's precision, as the model's own head computes: outside the model's autocast-wrapped
        # forward a bf16 head would otherwise meet the float32 hidden states of mixed-precision training.
        logits_N_V = self.linear(hidden_N_H.to(self.linear.weight.dtype))
        if self.scale:
            logits_N_V = logits_N_V * self.scale
        if self.divisor:
            logits_N_V = logits_N_V / self.divisor
        if self.cap:
            logits_N_V = torch.tanh(logits_N_V / self.cap) * self.cap
        return logits_N_V

    @torch.no_grad()
    def _check(self, model) -> None:
        """A head of another kind (a transform this class does not know) is refused, not silently wrong."""
        ids_1_L = torch.arange(1, 5, device=self.linear.weight.device)[None] % self.vocabulary
        logits_1_L_V = model(input_ids=ids_1_L, use_cache=False).logits.float()
        gap = float((self(hidden_states(model, ids_1_L, None)).float() - logits_1_L_V).abs().max())
        if not gap <= 1e-3 * max(1.0, float(logits_1_L_V.abs().max())):
            raise KdError(
                f"{model.config.name_or_path}: the model's logits are not its output head applied to its last hidden "
                f"state (gap {gap:.3g}); kd supports linear heads with a logit scale or soft-capping"
            )


def hidden_states(model, ids_B_L: torch.Tensor, mask_B_L: torch.Tensor | None,
                  positions_B_L: torch.Tensor | None = None) -> torch.Tensor:
    """The final (normalised) hidden states [B, L, H], for `OutputHead` to apply the head to the
    positions the caller needs. The model (or its DDP wrapper, so that DDP sees the forward) runs with
    its head on one position only (logits_to_keep=1); the decoder's output is taken by a hook, not
    with output_hidden_states, which would keep every layer's states (and under mixed precision
    accelerate would copy them all to float32). Packed rows (several sequences in one row, no
    padding): `mask_B_L` None and `positions_B_L` restarting at 0 for each sequence; transformers then
    masks attention block-diagonally (masking_utils.find_packed_sequence_indices; FlashAttention's
    varlen kernel under flash_attention_2)."""
    decoder = getattr(model, "module", model).get_decoder()
    captured: list[torch.Tensor] = []
    hook = decoder.register_forward_hook(lambda _module, _inputs, out: captured.append(out.last_hidden_state))
    try:
        model(input_ids=ids_B_L, attention_mask=mask_B_L, position_ids=positions_B_L, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return captured[-1]


def load_adapter(base, adapter: Path, adapter_name: str = "default", is_trainable: bool = False):
    """PeftModel over `base` from an adapter directory; one line if the adapter was made for another model."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter), adapter_name=adapter_name, is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        raise adapter_misfit(adapter, err) from None


def adapter_misfit(adapter: Path | None, err: Exception) -> KdError:
    return KdError(
        f"{adapter}: this LoRA adapter does not fit the student ({str(err).strip().splitlines()[0][:200]}); "
        "use an adapter exported from a run of this student"
    )
