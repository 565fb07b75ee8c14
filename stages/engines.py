"""Engines: the two jobs the stages need from a model runtime.

    sample(prompts, n, params, seeds, adapter) -> completions with the sampler's logprob of every token
    score(sequences, prompt_lengths, top_k)    -> the model's logprob of every completion token, and
                                                  optionally its top-k tokens at every completion position

`hf` (this module) runs transformers in-process on CPU or GPU and loads a LoRA adapter with PEFT.
vLLM and SGLang implement the same two methods, so the stages never know which engine they drive.

Reproducibility: each sample draws its randomness from its own generator seeded by
(run seed, epoch, prompt id, sample index) (see `sample_seed`), never from the batch layout, so
the same sample comes out whether prompts are batched, sharded or resumed differently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (an end-of-turn token was sampled) or "length"


@dataclass
class Scores:
    """A scorer's view of one sequence's completion: T tokens, K = top_k (0: no top-k asked for)."""

    logprobs: np.ndarray  # [T] float32: logprob of each completion token
    top_ids: np.ndarray  # [T, K] int32: the K most likely tokens at each completion position, most likely first
    top_logprobs: np.ndarray  # [T, K] float32: their logprobs

    @classmethod
    def without_top_k(cls, logprobs: np.ndarray) -> "Scores":
        empty = np.zeros((len(logprobs), 0))
        return cls(np.asarray(logprobs, np.float32), empty.astype(np.int32), empty.astype(np.float32))


class Engine(Protocol):
    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        seeds: Sequence[int],
        params: SamplingParams,
        adapter: Path | None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """One completion per prompt; `prompts` repeats a prompt once per wanted sample."""

    def score(
        self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
        progress: Callable[[int], None] | None = None, top_k: int = 0,
    ) -> list[Scores]:
        """Logprob of each token after the prompt (and the top_k most likely tokens there), one per sequence."""


def sample_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def length_batches(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices grouped by similar length so that a padded batch holds at most `max_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # ascending order: the newcomer is the longest of its batch
        if current and (longest * (len(current) + 1) > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_causal_lm(path: str | Path, dtype: str = "auto", device: str = "auto"):
    """A transformers causal LM in eval mode; raises a one-line error for a missing directory."""
    from transformers import AutoModelForCausalLM

    from kd.stages.errors import KdError

    local = Path(path)
    if (str(path).startswith((".", "/")) or local.exists()) and not (local / "config.json").is_file():
        raise KdError(f"{path}: no model here (config.json missing); build the toy world with `kd toy` or fix the path")
    torch_device = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype, torch_device))
    return model.to(torch_device).eval()


# Logits materialised at once wherever kd applies a model's head itself (64 MiB of float32): 110
# positions at a 151,936-token vocabulary, a toy batch's every position at 300.
HEAD_CHUNK_VALUES = 1 << 24


class OutputHead:
    """hidden states [N, H] -> logits [N, V], as the model's own head computes them: a linear layer,
    then the logit scale (Cohere), the division by `logits_scaling` (Granite) or the final
    soft-capping (Gemma 2) where the model's config asks for it. With it the stages make logits for
    chosen positions, a chunk at a time, never [B, L, V] at once (see kd.stages.loss)."""

    def __init__(self, model):
        from kd.stages.errors import KdError

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
        from kd.stages.errors import KdError

        ids_1_L = torch.arange(1, 5, device=self.linear.weight.device)[None] % self.vocabulary
        logits_1_L_V = model(input_ids=ids_1_L, use_cache=False).logits.float()
        gap = float((self(hidden_states(model, ids_1_L, None)).float() - logits_1_L_V).abs().max())
        if not gap <= 1e-3 * max(1.0, float(logits_1_L_V.abs().max())):
            raise KdError(
                f"{model.config.name_or_path}: the model's logits are not its output head applied to its last hidden "
                f"state (gap {gap:.3g}); kd supports linear heads with a logit scale or soft-capping"
            )


def hidden_states(model, ids_B_L: torch.Tensor, mask_B_L: torch.Tensor | None) -> torch.Tensor:
    """The final (normalised) hidden states [B, L, H], for `OutputHead` to apply the head to the
    positions the caller needs. The model (or its DDP wrapper, so that DDP sees the forward) runs with
    its head on one position only (logits_to_keep=1); the decoder's output is taken by a hook, not
    with output_hidden_states, which would keep every layer's states (and under mixed precision
    accelerate would copy them all to float32)."""
    decoder = getattr(model, "module", model).get_decoder()
    captured: list[torch.Tensor] = []
    hook = decoder.register_forward_hook(lambda _module, _inputs, out: captured.append(out.last_hidden_state))
    try:
        model(input_ids=ids_B_L, attention_mask=mask_B_L, use_cache=False, logits_to_keep=1)
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


def adapter_misfit(adapter: Path | None, err: Exception) -> "KdError":
    from kd.stages.errors import KdError

    return KdError(
        f"{adapter}: this LoRA adapter does not fit the student ({str(err).strip().splitlines()[0][:200]}); "
        "use an adapter exported from a run of this student"
    )


class HFEngine:
    """transformers in-process. The base model stays loaded; adapters are swapped by path.

    A new adapter path always loads a new PEFT adapter, and the previous one is deleted, so a stale
    adapter cannot be sampled from.
    """

    def __init__(
        self,
        model,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        max_batch_tokens: int = 32768,
        max_batch_rows: int = 256,
    ):
        self.base = model.eval()
        self.model = self.base
        self.adapter: Path | None = None
        self._adapter_serial = 0
        self.stop_token_ids = torch.tensor(sorted(set(stop_token_ids)))
        self.pad_token_id = pad_token_id
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_rows = max_batch_rows
        self.head: OutputHead | None = None  # made at the first score call: a sampler needs none

    @classmethod
    def load(cls, model_path: str | Path, stop_token_ids: Sequence[int], pad_token_id: int, dtype: str = "auto",
             device: str = "auto", **batching) -> "HFEngine":
        return cls(load_causal_lm(model_path, dtype, device), stop_token_ids, pad_token_id, **batching)

    @property
    def device(self) -> torch.device:
        return self.base.device

    def use_adapter(self, adapter: Path | None) -> None:
        if adapter is None:
            if self.adapter is not None:
                self.base = self.model.unload()  # drops LoRA layers, keeps base weights untouched
                self.model = self.base
            self.adapter = None
            return
        adapter = Path(adapter)
        if self.adapter == adapter:
            return
        self._adapter_serial += 1
        name = f"policy{self._adapter_serial}"
        if self.adapter is None:
            self.model = load_adapter(self.base, adapter, adapter_name=name).eval()
        else:
            previous = self.model.active_adapter
            self.model.load_adapter(str(adapter), adapter_name=name)
            self.model.set_adapter(name)
            self.model.delete_adapter(previous)
            self.model.eval()
        self.adapter = adapter

    @torch.no_grad()
    def sample(self, prompts, seeds, params: SamplingParams, adapter: Path | None, progress=None) -> list[Completion]:
        self.use_adapter(adapter)
        budget = [len(p) + params.max_new_tokens for p in prompts]
        results: list[Completion | None] = [None] * len(prompts)
        for batch in length_batches(budget, self.max_batch_tokens, self.max_batch_rows):
            outs = self._decode([prompts[i] for i in batch], [seeds[i] for i in batch], params)
            for i, out in zip(batch, outs):
                results[i] = out
            if progress is not None:
                progress(len(batch))
        return results  # type: ignore[return-value]

    def _decode(self, prompts, seeds, params: SamplingParams) -> list[Completion]:
        """Left-padded batched decoding with a KV cache; logprobs of the distribution sampled from.

        The recorded logprob is log softmax(logits / T) after top-p renormalisation: the behaviour
        policy's probability, which is what the importance ratio of the train stage divides by.
        """
        from transformers import DynamicCache

        device = self.device
        rows, longest = len(prompts), max(len(p) for p in prompts)
        input_ids_B_L = torch.full((rows, longest), self.pad_token_id, dtype=torch.long)
        mask_B_L = torch.zeros((rows, longest), dtype=torch.long)
        for r, p in enumerate(prompts):
            input_ids_B_L[r, longest - len(p):] = torch.tensor(p)
            mask_B_L[r, longest - len(p):] = 1
        input_ids_B_L, mask_B_L = input_ids_B_L.to(device), mask_B_L.to(device)
        positions_B_L = (mask_B_L.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        cache = DynamicCache(config=self.model.config)
        stop_ids = self.stop_token_ids.to(device)

        tokens_B_T, logprobs_B_T = [], []
        finished_B = torch.zeros(rows, dtype=torch.bool, device=device)
        stopped_B = torch.zeros(rows, dtype=torch.bool, device=device)
        step_ids, step_positions = input_ids_B_L, positions_B_L
        for _ in range(params.max_new_tokens):
            out = self.model(
                input_ids=step_ids, attention_mask=mask_B_L, position_ids=step_positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1,  # no [B, L, V] logits at the prompt
            )
            logprobs_B_V = behaviour_logprobs(out.logits[:, -1].float(), params.temperature, params.top_p)
            if params.greedy:
                next_B = logprobs_B_V.argmax(-1)
            else:
                probs_B_V = logprobs_B_V.exp().cpu()
                next_B = torch.stack(
                    [torch.multinomial(probs_B_V[r], 1, generator=generators[r])[0] for r in range(rows)]
                ).to(device)
            next_B = torch.where(finished_B, torch.full_like(next_B, self.pad_token_id), next_B)
            tokens_B_T.append(next_B)
            logprobs_B_T.append(logprobs_B_V.gather(-1, next_B[:, None])[:, 0])
            just_stopped_B = torch.isin(next_B, stop_ids) & ~finished_B
            stopped_B |= just_stopped_B
            finished_B |= just_stopped_B
            if bool(finished_B.all()):
                break
            step_ids = next_B[:, None]
            step_positions = step_positions[:, -1:] + 1
            mask_B_L = torch.cat([mask_B_L, torch.ones((rows, 1), dtype=mask_B_L.dtype, device=device)], dim=1)

        tokens = torch.stack(tokens_B_T, 1).tolist()
        logprobs = torch.stack(logprobs_B_T, 1).tolist()
        stops = set(self.stop_token_ids.tolist())
        completions = []
        for r in range(rows):
            ids, lps = [], []
            for tok, lp in zip(tokens[r], logprobs[r]):
                ids.append(tok)
                lps.append(lp)
                if tok in stops:
                    break
            completions.append(Completion(ids, lps, "stop" if bool(stopped_B[r]) else "length"))
        return completions

    @torch.no_grad()
    def score(self, sequences, prompt_lengths, progress=None, top_k: int = 0) -> list[Scores]:
        """One prefill per batch; the head runs on completion positions only, HEAD_CHUNK_VALUES logits
        at a time (a 150k vocabulary never makes a [B, L, V] tensor)."""
        from kd.stages.errors import KdError

        if self.head is None:
            self.head = OutputHead(self.base)
        vocabulary = self.head.vocabulary
        if top_k > vocabulary:
            raise KdError(f"score.top_k = {top_k} exceeds the teacher's vocabulary ({vocabulary}); use at most {vocabulary}")
        results: list[Scores | None] = [None] * len(sequences)
        lengths = [len(s) for s in sequences]
        rows_at_once = max(1, HEAD_CHUNK_VALUES // vocabulary)
        for batch in length_batches(lengths, self.max_batch_tokens, self.max_batch_rows):
            ids_B_L, mask_B_L = right_pad([sequences[i] for i in batch], self.pad_token_id)
            ids_B_L = ids_B_L.to(self.device)
            hidden_B_L_H = hidden_states(self.model, ids_B_L, mask_B_L.to(self.device))
            # logits at position t predict token t+1: completion tokens [start, end) need positions [start-1, end-1)
            if all(lengths[i] == prompt_lengths[i] for i in batch):  # nothing to score in this batch
                for i in batch:
                    results[i] = Scores(np.zeros(0, np.float32), np.zeros((0, top_k), np.int32), np.zeros((0, top_k), np.float32))
                continue
            rows_N = torch.cat([torch.full((lengths[i] - prompt_lengths[i],), r) for r, i in enumerate(batch)])
            positions_N = torch.cat([torch.arange(prompt_lengths[i] - 1, lengths[i] - 1) for i in batch])
            hidden_N_H, targets_N = hidden_B_L_H[rows_N, positions_N], ids_B_L[rows_N, positions_N + 1]
            token, top_ids, top_logprobs = [], [], []
            for first in range(0, len(positions_N), rows_at_once):
                logprobs_C_V = torch.log_softmax(self.head(hidden_N_H[first : first + rows_at_once]).float(), -1)
                token.append(logprobs_C_V.gather(-1, targets_N[first : first + rows_at_once, None])[:, 0].cpu())
                top_C_K = logprobs_C_V.topk(top_k, dim=-1)  # sorted, most likely first
                top_ids.append(top_C_K.indices.cpu().to(torch.int32))
                top_logprobs.append(top_C_K.values.cpu())
            token_N, top_ids_N_K, top_logprobs_N_K = (torch.cat(parts).numpy() for parts in (token, top_ids, top_logprobs))
            start = 0
            for i in batch:
                end = start + lengths[i] - prompt_lengths[i]
                results[i] = Scores(token_N[start:end], top_ids_N_K[start:end], top_logprobs_N_K[start:end])
                start = end
            if progress is not None:
                progress(len(batch))
        return results  # type: ignore[return-value]


def behaviour_logprobs(logits_B_V: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log of the distribution actually sampled from: softmax(logits / T), restricted to the top-p nucleus."""
    logprobs_B_V = torch.log_softmax(logits_B_V / temperature, -1)
    if top_p >= 1.0:
        return logprobs_B_V
    sorted_B_V, order_B_V = logprobs_B_V.sort(-1, descending=True)
    mass_before_B_V = sorted_B_V.exp().cumsum(-1) - sorted_B_V.exp()
    keep_sorted_B_V = mass_before_B_V < top_p  # always keeps the most likely token
    keep_B_V = torch.zeros_like(keep_sorted_B_V).scatter(-1, order_B_V, keep_sorted_B_V)
    masked_B_V = logprobs_B_V.masked_fill(~keep_B_V, float("-inf"))
    return torch.log_softmax(masked_B_V, -1)


def right_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in sequences)
    ids_B_L = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    mask_B_L = torch.zeros((len(sequences), longest), dtype=torch.long)
    for r, s in enumerate(sequences):
        ids_B_L[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask_B_L[r, : len(s)] = 1
    return ids_B_L, mask_B_L
