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
                past_key_values=cache, use_cache=True,
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
        from kd.stages.errors import KdError

        vocabulary = self.base.get_output_embeddings().out_features
        if top_k > vocabulary:
            raise KdError(f"score.top_k = {top_k} exceeds the teacher's vocabulary ({vocabulary}); use at most {vocabulary}")
        results: list[Scores | None] = [None] * len(sequences)
        lengths = [len(s) for s in sequences]
        for batch in length_batches(lengths, self.max_batch_tokens, self.max_batch_rows):
            ids_B_L, mask_B_L = right_pad([sequences[i] for i in batch], self.pad_token_id)
            ids_B_L = ids_B_L.to(self.device)
            logits_B_L_V = self.model(input_ids=ids_B_L, attention_mask=mask_B_L.to(self.device)).logits
            # Log-softmax over as many rows at once as fit in SCORE_CHUNK_VALUES floats: one call per
            # chunk instead of several per row (the toy's whole batch); for real vocabularies one row at a
            # time, over its completion positions only, as before.
            rows_at_once = max(1, SCORE_CHUNK_VALUES // (ids_B_L.shape[1] * vocabulary))
            for first in range(0, len(batch), rows_at_once):
                chunk = batch[first : first + rows_at_once]
                # logits at position t predict token t+1: completion tokens [start, end) need logits [start-1, end-1)
                low, high = min(prompt_lengths[i] for i in chunk) - 1, max(lengths[i] for i in chunk) - 1
                rows = slice(first, first + len(chunk))
                logprobs_C_T_V = torch.log_softmax(logits_B_L_V[rows, low:high].float(), -1)
                token_C_T = logprobs_C_T_V.gather(-1, ids_B_L[rows, low + 1 : high + 1, None])[..., 0].cpu().numpy()
                top_C_T_K = logprobs_C_T_V.topk(top_k, dim=-1)  # sorted, most likely first
                top_ids_C_T_K = top_C_T_K.indices.cpu().numpy().astype(np.int32)
                top_logprobs_C_T_K = top_C_T_K.values.cpu().numpy()
                for row, i in enumerate(chunk):
                    positions = slice(prompt_lengths[i] - 1 - low, lengths[i] - 1 - low)
                    results[i] = Scores(token_C_T[row, positions], top_ids_C_T_K[row, positions],
                                        top_logprobs_C_T_K[row, positions])
            if progress is not None:
                progress(len(batch))
        return results  # type: ignore[return-value]


# float32 log-probabilities the hf scorer materialises at once (64 MiB), beside the model's own logits.
SCORE_CHUNK_VALUES = 1 << 24


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
