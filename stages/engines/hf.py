"""The `hf` engine: transformers in-process on CPU or GPU, LoRA adapters loaded with PEFT."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kd.stages.config import EngineConfig
from kd.stages.engines.base import Completion, SamplingParams, Scores, length_batches, top_k_rows
from kd.stages.models import HEAD_CHUNK_VALUES, OutputHead, hidden_states, load_adapter, load_causal_lm


def build(engine: EngineConfig, model_path: str, stop_token_ids: Sequence[int], pad_token_id: int,
          student_rows: int | None = None, attn_implementation: str = "auto", **_) -> "HFEngine":
    """The registry's entry (kd.stages.engines.REGISTRY); adapters and top-k need no set-up here."""
    return HFEngine.load(
        model_path, stop_token_ids, pad_token_id, dtype=engine.dtype, device=engine.device,
        attn_implementation=attn_implementation, max_batch_tokens=engine.max_batch_tokens,
        max_batch_rows=engine.max_batch_rows, student_rows=student_rows,
    )


class HFEngine:
    """transformers in-process. The base model stays loaded; adapters are swapped by path.

    A new adapter path always loads a new PEFT adapter, and the previous one is deleted, so a stale
    adapter cannot be sampled from. `student_rows`: a scorer's top-k is taken among ids below it
    (kd.stages.engines.base; None: the whole vocabulary).
    """

    def __init__(
        self,
        model,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        max_batch_tokens: int = 32768,
        max_batch_rows: int = 256,
        student_rows: int | None = None,
    ):
        self.base = model.eval()
        self.model = self.base
        self.adapter: Path | None = None
        self._adapter_serial = 0
        self.stop_token_ids = torch.tensor(sorted(set(stop_token_ids)))
        self.pad_token_id = pad_token_id
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_rows = max_batch_rows
        self.student_rows = student_rows
        self.head: OutputHead | None = None  # made at the first score call: a sampler needs none

    @classmethod
    def load(cls, model_path: str | Path, stop_token_ids: Sequence[int], pad_token_id: int, dtype: str = "auto",
             device: str = "auto", attn_implementation: str = "auto", **batching) -> "HFEngine":
        return cls(load_causal_lm(model_path, dtype, device, attn_implementation), stop_token_ids, pad_token_id,
                   **batching)

    @property
    def device(self) -> torch.device:
        return self.base.device

    def close(self) -> None:
        """Drop the model and its head (their memory goes back once no other reference holds them)."""
        self.base = self.model = self.head = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    home: torch.device | None = None  # where a sleeping engine's model goes back to

    def sleep(self) -> None:
        """On a GPU: the model, adapter and head included, moves to CPU memory and the freed blocks go
        back to the device (the trainer or a vLLM engine may need them). On CPU: nothing to give back."""
        self.home = self.device
        if self.home.type == "cuda":
            self.base.to("cpu")
            torch.cuda.empty_cache()

    def wake(self) -> None:
        if self.home is not None and self.home.type == "cuda":
            self.base.to(self.home)

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
        at a time (a 150k vocabulary never makes a [B, L, V] tensor). The logprobs are normalised over the
        whole vocabulary; the top-k is chosen among the first `student_rows` ids."""
        if self.head is None:
            self.head = OutputHead(self.base)
        vocabulary = self.head.vocabulary
        rows = top_k_rows(top_k, vocabulary, self.student_rows)
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
                top_C_K = logprobs_C_V[:, :rows].topk(top_k, dim=-1)  # sorted, most likely first
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
