"""The `sglang` engine: a running SGLang server, over its native /generate API.

    python -m sglang.launch_server --model-path Qwen/Qwen3-32B --port 30000            # a teacher
    kd score --epoch 0 --set score.engine.kind=sglang --set score.engine.server=http://127.0.0.1:30000

Server mode only: SGLang needs CUDA (its CPU backend AVX-512), so nothing here can start one, and an
in-process `sglang.Engine` would be code that no test of this project ever ran. What is tested
(tests/test_sglang.py): every request kd builds against the fields of SGLang's own request
classes, read from its wheel, and the parsing of answers shaped as its code writes them, served by a
stand-in HTTP server from a real hf scoring of the same tokens.

Facts this code relies on, read in the sources of SGLang 0.5.23 (wheel sglang-0.5.23-cp311):
- Request, `GenerateReqInput` (sglang/srt/managers/io_struct.py): `input_ids` (token ids: nothing
  is re-tokenised), `sampling_params` (`SamplingParams`, sglang/srt/sampling/sampling_params.py:
  max_new_tokens, temperature, top_p, stop_token_ids, sampling_seed, skip_special_tokens),
  `return_logprob`, `logprob_start_len` (default -1: output tokens only), `top_logprobs_num`,
  `lora_path` (the name an adapter was loaded under), `return_sampling_mask`, `sampling_logprobs_mode`.
- Answer: {"output_ids", "meta_info": {"finish_reason": {"type": "stop" | "length" | "abort", ...},
  "input_token_logprobs", "output_token_logprobs": [[logprob, token_id, null], ...],
  "input_top_logprobs": [null | [[logprob, token_id, null] x K], ...], ...}}
  (managers/tokenizer_manager.py, add_logprob_to_meta_info and detokenize_logprob_tokens;
  schedule_batch.py, FINISH_*.to_json).
- Input logprobs from `logprob_start_len` = s cover tokens s .. L-1, and the first is None
  (managers/scheduler_components/logprob_result_processor.py: "add None at start"; the same for the
  top logprobs). kd scores from the token before the completion, s = P - 1, and drops that None.
- Output logprobs are of the tempered distribution, log_softmax(logits / T) (layers/sampler.py; raw
  logits only when the server runs with SGLANG_RETURN_ORIGINAL_LOGPROB=1, which must not be set for
  kd), the opposite of vLLM's default: at top_p = 1 that is the behaviour logprob at any T. They are
  not renormalised to a top-p nucleus, and SGLang gives the nucleus' own logprob only with sampling
  masks, which need a top_k bound (managers/scheduler.py, --sampling-mask-max-tokens): the config
  refuses SGLang sampling at top_p < 1 rather than sample from another distribution than asked.
- `sampling_seed` is honoured only by a server started with --enable-deterministic-inference
  (sampling/sampling_batch_info.py); kd reads /server_info before sampling and refuses one without.
- Input ids >= the model config's vocab_size - 1 come back as 0 in input_token_logprobs
  (logprob_result_processor.py: "Clip padded hash values"); kd accepts 0 there.
- `top_logprobs_num` has no bound but the vocabulary (128 under prefill/decode disaggregation,
  disaggregation/utils.py). For a teacher with more rows than the student (student_rows,
  kd.stages.engines.base) kd asks for K + (teacher rows - student rows) and keeps the K best ids
  below student_rows; the top logprobs come most likely first (torch.topk, sorted).
- Each sample is its own request with its own `sampling_seed` (one per (prompt, sample index), as
  every kd engine), rather than `n` samples of one request, whose draws would depend on n.
- LoRA: POST /load_lora_adapter {lora_name, lora_path} (LoadLoRAAdapterReqInput), POST
  /unload_lora_adapter {lora_name}; a new adapter directory is loaded under a new name and the
  previous one unloaded (best effort: the server may have evicted it), and kd never reuses a name.
  A student server is started with --enable-lora --max-lora-rank R --lora-target-modules all
  (sglang/srt/arg_groups/fields/lora.py) and --enable-deterministic-inference.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from kd.stages.config import EngineConfig
from kd.stages.engines.base import Completion, SamplingParams, Scores, student_top_k, top_k_asked, top_k_rows
from kd.stages.engines.http import ServerClient, Unreachable
from kd.stages.errors import KdError
from kd.stages.progress import console

SGLANG_VERSION = "0.5.23"  # the version whose sources the facts above were read in (and the tests check)


def build(engine: EngineConfig, model_path: str, stop_token_ids: Sequence[int], student_rows: int | None = None,
          **_) -> "SGLangServerEngine":
    """The registry's entry (kd.stages.engines.REGISTRY); the config makes sure engine.server is set.
    The model's vocab_size is read from `model_path`'s config, which the server is taken to serve."""
    from transformers import AutoConfig

    vocab_size = getattr(AutoConfig.from_pretrained(model_path).get_text_config(), "vocab_size", None)
    return SGLangServerEngine(engine, model_path, stop_token_ids, vocab_size, student_rows)


def sample_request(prompt: Sequence[int], seed: int, params: SamplingParams, stop_token_ids: Sequence[int],
                   adapter_name: str | None) -> dict:
    """The /generate body that samples one completion of `prompt` with its behaviour logprobs."""
    body = {
        "input_ids": [int(t) for t in prompt],
        "sampling_params": {
            "max_new_tokens": params.max_new_tokens, "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": params.top_p, "stop_token_ids": [int(t) for t in stop_token_ids],
            "sampling_seed": seed % (2**63), "skip_special_tokens": True,
        },
        "return_logprob": True,
    }
    if adapter_name is not None:
        body["lora_path"] = adapter_name
    return body


def score_request(sequence: Sequence[int], prompt_length: int, top_k: int) -> dict:
    """The /generate body that returns the logprob of every token after the prompt (one prefill), and
    the `top_k` most likely tokens there (the number asked: kd.stages.engines.top_k_asked)."""
    body = {
        "input_ids": [int(t) for t in sequence],
        "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
        "return_logprob": True,
        "logprob_start_len": prompt_length - 1,
    }
    if top_k:
        body["top_logprobs_num"] = top_k
    return body


def completion_from(answer: dict, params: SamplingParams) -> Completion:
    """A sampled completion from a /generate answer (see the module docstring for its shape)."""
    meta = answer["meta_info"]
    reason = meta["finish_reason"]["type"]
    if reason == "abort":
        raise KdError(f"SGLang server aborted a sample: {str(meta['finish_reason'].get('message'))[:200]}")
    entries = meta["output_token_logprobs"]
    ids = [int(entry[1]) for entry in entries]
    if "output_ids" in answer and [int(t) for t in answer["output_ids"]] != ids:
        raise ValueError("output_ids and output_token_logprobs name different tokens")
    if reason not in ("stop", "length"):
        raise ValueError(f"finish_reason {meta['finish_reason']}")
    if reason == "length" and len(ids) < params.max_new_tokens:
        raise KdError(f"SGLang server stopped a completion at {len(ids)} of max_new_tokens = {params.max_new_tokens} "
                      "tokens (its context length); raise its --context-length or lower generate.max_new_tokens")
    return Completion(ids, [float(entry[0]) for entry in entries], reason)


def scores_from(answer: dict, sequence: Sequence[int], prompt_length: int, top_k: int,
                vocab_size: int | None = None, student_rows: int | None = None) -> Scores:
    """The completion's scores from a /generate answer to `score_request`. `vocab_size`: the model
    config's, above which SGLang reports input ids as 0 (see the module docstring); the top_k kept at
    each position are the most likely of the ids below `student_rows` (None: of all)."""
    meta = answer["meta_info"]
    entries = meta["input_token_logprobs"]
    completion = [int(t) for t in sequence[prompt_length:]]
    if len(entries) != len(completion) + 1 or entries[0][0] is not None:
        raise ValueError(f"{len(entries)} input logprobs (the first None) for {len(completion)} completion tokens")
    reported = [int(entry[1]) for entry in entries[1:]]
    clipped = vocab_size - 1 if vocab_size else None
    if any(r != t and not (r == 0 and clipped is not None and t >= clipped) for r, t in zip(reported, completion)):
        raise ValueError("input_token_logprobs name other tokens than the sequence's")
    logprobs = np.array([float(entry[0]) for entry in entries[1:]], np.float32)
    if not top_k:
        return Scores.without_top_k(logprobs)
    top = meta["input_top_logprobs"]
    asked = top_k_asked(top_k, vocab_size, student_rows)
    if len(top) != len(entries) or any(len(position) != asked for position in top[1:]):
        raise ValueError(f"input_top_logprobs: not {asked} entries at each of {len(completion)} positions")
    kept = [student_top_k([(int(entry[1]), float(entry[0])) for entry in position], top_k, student_rows)
            for position in top[1:]]
    top_ids = np.array([[token for token, _ in position] for position in kept], np.int32).reshape(-1, top_k)
    top_logprobs = np.array([[logprob for _, logprob in position] for position in kept], np.float32).reshape(-1, top_k)
    return Scores(logprobs, top_ids, top_logprobs)


class SGLangServerEngine(ServerClient):
    """A running SGLang server: a teacher kept loaded across epochs, or a student that loads each
    epoch's adapter at run time."""

    server_name = "SGLang server"
    start_hint = "`python -m sglang.launch_server`"
    info_path = "/model_info"
    lost = r"LoRA adapter that has never been loaded"  # HTTP 400 (managers/tokenizer_manager.py, _resolve_lora_path)

    def __init__(self, engine: EngineConfig, model_path: str, stop_token_ids: Sequence[int],
                 vocab_size: int | None = None, student_rows: int | None = None):
        self._adapters: dict[str, tuple[Path, str]] = {}  # server -> the adapter loaded there now, and its name
        self._seeded: set[str] = set()  # servers whose /server_info said that sampling_seed is honoured
        super().__init__(engine, model_path)  # (which may forget a server that fails: those must exist)
        self.stop_token_ids = list(stop_token_ids)
        self.vocab_size, self.student_rows = vocab_size, student_rows

    def _served_models(self, info: dict) -> list[tuple[str, list[str]]]:
        """SGLang's /model_info (http_server.py, 0.5.23): `model_path` (--model-path) and
        `served_model_name` (--served-model-name, else the model path); requests name no model."""
        names = [info["model_path"], info.get("served_model_name") or info["model_path"]]
        return [(info["model_path"], names)]

    def close(self) -> None:
        """Unload kd's adapter from each server, best effort (the servers outlive kd and may have
        evicted it already)."""
        for url in list(self._adapters):
            self._unload(url)

    def _forget(self, url: str) -> None:
        super()._forget(url)
        self._adapters.pop(url, None)
        self._seeded.discard(url)

    def _unload(self, url: str) -> None:
        name = self._adapters.pop(url)[1]
        try:
            self._send(url, "POST", "/unload_lora_adapter", {"lora_name": name}, True, self.engine.request_timeout)
        except (KdError, Unreachable) as err:
            console.print(f"[yellow]warning: could not unload adapter {name} from {url}: {err}")

    def _adapter_name(self, url: str, adapter: Path | None) -> str | None:
        """The name `adapter` is loaded under at server `url`, loaded first if it is new there."""
        if adapter is None:
            return None
        adapter = Path(adapter).resolve()
        with self._url_locks[url]:
            if url not in self._adapters or self._adapters[url][0] != adapter:
                name = f"kd-{adapter.parent.parent.name}-{adapter.parent.name}-{time.time_ns()}"
                self._send(url, "POST", "/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter)}, True,
                           self.engine.request_timeout)
                if url in self._adapters:
                    self._unload(url)
                self._adapters[url] = (adapter, name)
            return self._adapters[url][1]

    def _require_seeded_sampling(self, url: str) -> None:
        if url not in self._seeded:
            info = self._send(url, "GET", "/server_info", None, True, self.engine.request_timeout)
            if not info.get("enable_deterministic_inference"):
                raise KdError(
                    f"{self.server_name} {url}: started without --enable-deterministic-inference, so it ignores "
                    "sampling_seed and kd's samples would not be reproducible; restart it with that flag"
                )
            self._seeded.add(url)

    def sample(self, prompts, seeds, params: SamplingParams, adapter: Path | None, progress=None) -> list[Completion]:
        def body(item, url) -> dict:
            self._require_seeded_sampling(url)
            return sample_request(item[0], item[1], params, self.stop_token_ids, self._adapter_name(url, adapter))

        return self._post_each("/generate", list(zip(prompts, seeds)), body,
                               lambda item, answer: completion_from(answer, params), "/generate answer to a sample",
                               progress, params.max_new_tokens)

    def score(self, sequences, prompt_lengths, progress=None, top_k: int = 0) -> list[Scores]:
        top_k_rows(top_k, self.vocab_size, self.student_rows)
        asked = top_k_asked(top_k, self.vocab_size, self.student_rows)
        return self._post_each(
            "/generate", list(zip(sequences, prompt_lengths)), lambda item, url: score_request(item[0], item[1], asked),
            lambda item, answer: scores_from(answer, item[0], item[1], top_k, self.vocab_size, self.student_rows),
            "/generate answer to a scoring", progress, 1,
        )
