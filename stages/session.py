"""What one process keeps loaded across stages and epochs: tokenizers, engines and the student
being trained.

`kd loop` holds one Session for the whole run, so the teacher, the student's base weights and the
trainable student load once; a standalone stage command builds its own. Either way every stage reads its inputs from disk
and writes its outputs to disk, so both paths produce the same datasets.

GPU memory: of the engines that sleep (in-process, EngineConfig.sleep; kd.stages.engines.base), at
most one is awake at a time: the one a stage last asked for. Asking for an engine puts the others
to sleep first (a new vLLM engine sizes its KV cache by the memory free as it starts) and wakes it,
and the loop puts to sleep those the next stage does not use (`sleep_engines`, from the stages'
`engines` in kd.stages.pipeline), so train runs with every such engine asleep. Each sleep and wake
is logged (logger kd.stages.session, INFO) with its duration.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from kd.stages import engines, prompts as prompts_lib
from kd.stages.config import DEFAULT_TEACHER, Config, EngineConfig, teacher_field
from kd.stages.errors import KdError

log = logging.getLogger(__name__)


def quiet_transformers() -> None:
    """Per-load progress bars of transformers drown the per-epoch lines of a long loop."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    local = Path(path)
    # A hub id is org/name; a path whose first folder exists here (runs/...) is a local one, missing.
    looks_local = path.startswith((".", "/")) or local.exists() or (len(local.parts) > 1 and Path(local.parts[0]).is_dir())
    if looks_local and not local.is_dir():
        raise KdError(f"{path}: model directory not found; build the toy world with `kd toy` or fix the path")
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise KdError(f"{path}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None


def check_same_vocabulary(student_path: str, student, teacher_path: str, teacher) -> None:
    """Teacher logprobs of student tokens are only meaningful if every id the student can emit is the
    same token for the teacher. Chat templates may differ: each model renders prompts with its own.
    Cross-tokenizer distillation is out of scope."""
    teacher_vocab = teacher.get_vocab()
    differing = {token: i for token, i in student.get_vocab().items() if teacher_vocab.get(token) != i}
    if differing:
        token, i = min(differing.items(), key=lambda item: item[1])
        raise KdError(
            f"{teacher_path}: the teacher's vocabulary differs from the student's ({student_path}): "
            f"{len(differing)} student ids differ, e.g. id {i} is {token!r} for the student and "
            f"{teacher.convert_ids_to_tokens(i)!r} for the teacher; distillation over sampled tokens needs "
            "one shared vocabulary (cross-tokenizer distillation is not supported)"
        )


def check_output_rows(student_path: str, teacher_path: str) -> int:
    """The rows of the student's output head (its config's vocab_size), after refusing a teacher with
    fewer: the student could sample ids that the teacher has no logprob for. A teacher with more rows
    (a larger model of the same family, its embedding padded further) is fine: its top-k is taken
    over the student's ids (kd.stages.engines.base)."""
    rows = {}
    for path in (student_path, teacher_path):
        try:
            rows[path] = engines.output_rows(path)
        except (OSError, ValueError) as err:
            raise KdError(f"{path}: cannot read the model's config.json ({str(err).splitlines()[0][:200]})") from None
    student, teacher = rows[student_path], rows[teacher_path]
    if teacher < student:
        raise KdError(
            f"{teacher_path}/config.json: the teacher's output head has {teacher} rows (vocab_size), fewer than the "
            f"student's {student} ({student_path}/config.json); the student could sample ids the teacher cannot score: "
            f"use a teacher with at least {student} rows"
        )
    return student


def stop_token_ids(tokenizer, model_path: str) -> list[int]:
    """Every id that ends a turn: the tokenizer's eos and each id of the model's
    `generation_config.eos_token_id` (instruct models often list several; transformers and vLLM stop
    at all of them)."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id}
    try:
        listed = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's eos alone
        listed = None
    ids.update(listed if isinstance(listed, list) else [listed])
    ids.discard(None)
    if not ids:
        raise KdError(f"{model_path}: the tokenizer has no eos_token and generation_config no eos_token_id; "
                      "set one so that generation can stop")
    return sorted(ids)


def make_engine(engine: EngineConfig, model_path: str, tokenizer, lora_rank: int | None = None, seed: int = 0,
                max_logprobs: int = 0, student_rows: int | None = None, attn_implementation: str = "auto") -> engines.Engine:
    """The engine `engine.kind` (kd.stages.engines.REGISTRY) for `model_path`, stopping at its end ids;
    `lora_rank` is set for a student that will load adapters, `max_logprobs` for a scorer asked for
    that many top tokens, `student_rows` for a scorer whose top-k is over the student's ids (the rows
    of the student's output head; kd.stages.engines.base), `attn_implementation` for an hf engine
    (train.attn_implementation)."""
    return engines.make(engine, model_path, stop_token_ids(tokenizer, model_path),
                        tokenizer.pad_token_id or tokenizer.eos_token_id, lora_rank, seed, max_logprobs, student_rows,
                        attn_implementation)


@dataclass
class Sleeper:
    """A held engine that sleeps while unused: how the log names it, and whether it is asleep now."""

    label: str
    asleep: bool = False


def return_cached_gpu_memory() -> None:
    """Blocks this process's tensors freed (the trainer's, above all) go back to the GPU, for an engine
    about to start or wake there (vLLM's engine runs in a process of its own)."""
    torch = sys.modules.get("torch")  # not imported: this process never used a GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class Session:
    def __init__(self, config: Config, progress: bool = True):
        self.config = config
        self.progress = progress
        if not progress:
            quiet_transformers()
        self._engines: dict[tuple, object] = {}
        self._sleepers: dict[tuple, Sleeper] = {}  # the held engines that sleep, by the key of _engines
        self._teacher_tokenizers: dict[str, object] = {}
        self._student_rows: int | None = None  # the rows of the student's output head, once a teacher was checked
        self._prompts: dict[tuple, list] = {}
        self._opening_checked: set[str] = set()  # the teachers whose generation prompts were compared with the student's
        self._policy = None

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.config.student)

    def teacher_tokenizer(self, teacher: str = DEFAULT_TEACHER):
        """The tokenizer of teacher `teacher` (a name of config.teachers), refused unless it shares the
        student's vocabulary and has a row for every id of the student's output head."""
        path = self.config.teachers[teacher].model
        if path not in self._teacher_tokenizers:
            loaded = load_tokenizer(path)
            check_same_vocabulary(self.config.student, self.tokenizer, path, loaded)
            self._student_rows = check_output_rows(self.config.student, path)
            self._teacher_tokenizers[path] = loaded
        return self._teacher_tokenizers[path]

    def engine(self, role: str, engine: EngineConfig, teacher: str = DEFAULT_TEACHER):
        """The engine for `role` ('student' or 'teacher': then the teacher named `teacher`), built once
        per engine config, awake: any other engine that sleeps is asleep."""
        key = (role, teacher if role == "teacher" else "", repr(engine))
        if key not in self._engines:
            self._sleep(list(self._sleepers))  # a new vLLM engine sizes itself by the GPU memory free as it starts
            self._offload_policy()
            return_cached_gpu_memory()
            if role == "student":
                self._engines[key] = make_engine(
                    engine, self.config.student, self.tokenizer, self.config.train.lora_rank, self.config.seed,
                    attn_implementation=self.config.train.attn_implementation,
                )
            else:
                tokenizer = self.teacher_tokenizer(teacher)  # refuse a mismatched teacher before loading its weights
                rows, top_k = self._student_rows, self.config.score.top_k
                if top_k > rows:
                    raise KdError(f"score.top_k = {top_k} exceeds the teacher's vocabulary over the student's ids: the "
                                  f"student's output head has {rows} rows ({self.config.student}); use at most {rows}")
                self._engines[key] = make_engine(engine, self.config.teachers[teacher].model, tokenizer,
                                                 seed=self.config.seed, max_logprobs=top_k, student_rows=rows,
                                                 attn_implementation=self.config.train.attn_implementation)
            if engine.sleep and not engine.server and hasattr(self._engines[key], "sleep"):
                who = f"teacher {teacher}" if role == "teacher" and teacher != DEFAULT_TEACHER else role
                self._sleepers[key] = Sleeper(f"{who} ({engine.kind})")
        elif key in self._sleepers and self._sleepers[key].asleep:
            self._sleep([other for other in self._sleepers if other != key])
            self._wake(key)
        return self._engines[key]

    def sleep_engines(self, keep: tuple[str, ...] = ()) -> None:
        """Put to sleep every held engine that sleeps, but those of the roles in `keep` ('student',
        'teacher'): the loop calls it before each stage with the roles the stage uses."""
        self._sleep([key for key in self._sleepers if key[0] not in keep])

    def _sleep(self, keys: list[tuple]) -> None:
        for key in keys:
            if not self._sleepers[key].asleep:
                started = time.time()
                self._engines[key].sleep()
                self._sleepers[key].asleep = True
                log.info("sleep %s (%.1fs)", self._sleepers[key].label, time.time() - started)

    def _wake(self, key: tuple) -> None:
        started = time.time()
        self._offload_policy()
        return_cached_gpu_memory()
        self._engines[key].wake()
        self._sleepers[key].asleep = False
        log.info("wake %s (%.1fs)", self._sleepers[key].label, time.time() - started)

    def _offload_policy(self) -> None:
        """The trained student to CPU memory before an engine starts or wakes on the GPU, so that the
        engine finds the memory it was sized for free (the train stage takes the student back)."""
        started = time.time()
        if self._policy is not None and self._policy.offload():
            log.info("policy to CPU (%.1fs)", time.time() - started)

    def policy(self):
        """The student with a trainable LoRA, for the train stage (`kd.stages.policy.Policy`)."""
        if self._policy is None:
            from kd.stages.policy import Policy  # torch and PEFT: only processes that train load them

            self._policy = Policy(self.config)
        return self._policy

    def close(self) -> None:
        """Stop in-process engines now: vLLM's engine-core processes, left to interpreter exit, can abort it."""
        running, self._engines, self._sleepers = list(self._engines.values()), {}, {}
        failed = None
        for engine in running:  # every engine is closed, even when one's close fails
            try:
                engine.close()
            except Exception as err:  # noqa: BLE001 - re-raised below, after the others closed
                failed = failed or err
        if failed is not None:
            raise failed

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def prompts(self, path: str, max_new_tokens: int, budget_field: str = "generate.max_new_tokens") -> list:
        """The tokenized prompt file, loaded once per process (the loop reads it every epoch), each
        prompt routed to its teacher (score.route_by). Every prompt plus `max_new_tokens` (the config
        field `budget_field`) must fit the student's and its teacher's contexts (and their engines'
        max_model_len), each in its own template: checked before anything is sampled."""
        key = (path, max_new_tokens)
        if key not in self._prompts:
            fix = f"after {budget_field} = {max_new_tokens}; shorten the prompt or lower {budget_field}"

            def room(role: str, teacher: str = DEFAULT_TEACHER) -> tuple[int, str]:
                positions, why = self.context(role, teacher)
                if positions <= max_new_tokens:
                    raise KdError(f"config field {budget_field}: {max_new_tokens} new tokens leave no room for a prompt in "
                                  f"{why}; lower {budget_field}")
                return positions - max_new_tokens, why

            positions, why = room("student")
            loaded = prompts_lib.load(path, self.tokenizer, positions, self.config.generate.chat_template_kwargs,
                                      f"{why} leaves {fix}", self.config.score.route_by, tuple(self.config.teachers),
                                      self.config.task)
            for teacher in dict.fromkeys(prompt.teacher for prompt in loaded):  # only the teachers prompts go to
                positions, why = room("teacher", teacher)
                for prompt in (prompt for prompt in loaded if prompt.teacher == teacher):
                    length = len(self.teacher_prompt_ids(prompt.token_ids, prompt.messages, teacher))
                    if length > positions:
                        raise KdError(f"{path}: prompt {prompt.id!r} is {length} tokens in the teacher's template, more "
                                      f"than the {positions} that {why} leaves {fix}")
            self._prompts[key] = loaded
        return self._prompts[key]

    def context(self, role: str, teacher: str = DEFAULT_TEACHER) -> tuple[int, str]:
        """The positions the `role` model ('student' or 'teacher', then the one named `teacher`) can
        attend to, and what sets them: its max_position_embeddings, or its engine's max_model_len when
        that is smaller."""
        from transformers import AutoConfig

        if role == "student":
            path, engine, section, who = self.config.student, self.config.generate.engine, "generate.engine", "student"
            self.tokenizer  # a missing model: one line first
        else:
            path, engine = self.config.teachers[teacher].model, self.config.teachers[teacher].engine
            section = teacher_field(teacher, "engine")
            who = "teacher" if teacher == DEFAULT_TEACHER else f"teacher {teacher}"
            self.teacher_tokenizer(teacher)  # a missing or mismatched model: one line first
        positions = int(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 4096))
        if engine.max_model_len and engine.max_model_len < positions:
            return engine.max_model_len, f"{section}.max_model_len = {engine.max_model_len} (the {who}'s engine)"
        return positions, f"the {who}'s context ({path}: {positions} positions)"

    def teacher_prompt_ids(self, student_ids: list[int], messages: str | None, teacher: str = DEFAULT_TEACHER) -> list[int]:
        """The prompt as teacher `teacher` sees it: a chat (`messages`, JSON) in the teacher's own
        template with its chat_template_kwargs, then its assistant_prefix; a plain prompt as the
        student's very ids. The first chat per teacher warns when the teacher's generation prompt with
        its assistant_prefix does not end as the student's (prefix_check)."""
        if messages is None:
            return student_ids
        spec = self.config.teachers[teacher]
        if teacher not in self._opening_checked:  # once per teacher: every chat of a prompt file shares the templates
            self._opening_checked.add(teacher)
            if (advice := prefix_advice(self.prefix_check(messages, teacher))) is not None:
                print(f"kd: warning: {advice}", file=sys.stderr)
        return prompts_lib.render(json.loads(messages), self.teacher_tokenizer(teacher), spec.chat_template_kwargs,
                                  spec.assistant_prefix)

    def prefix_check(self, messages: str, teacher: str = DEFAULT_TEACHER) -> dict | None:
        """The generation prompts of `messages` (a chat as JSON) in the student's and teacher
        `teacher`'s templates, the teacher's assistant_prefix, the one that would make the teacher's end
        as the student's (kd.stages.prompts.expected_prefix) and its config field; None when a template's
        generation prompt cannot be told apart (kd.stages.prompts.generation_prompt)."""
        spec = self.config.teachers[teacher]
        chat = json.loads(messages)
        student = prompts_lib.generation_prompt(chat, self.tokenizer, self.config.generate.chat_template_kwargs)
        teacher_prompt = prompts_lib.generation_prompt(chat, self.teacher_tokenizer(teacher), spec.chat_template_kwargs)
        if student is None or teacher_prompt is None:
            return None
        return {"student": student, "teacher": teacher_prompt, "assistant_prefix": spec.assistant_prefix,
                "expected": prompts_lib.expected_prefix(student, teacher_prompt),
                "field": teacher_field(teacher, "assistant_prefix")}


def prefix_advice(check: dict | None) -> str | None:
    """One line on a teacher whose assistant_prefix is not the one its generation prompt needs to end
    as the student's (a Session.prefix_check), with the value to set in both the YAML and the --set
    form; None when it is, or when the check could not be made."""
    if check is None or check["expected"] == check["assistant_prefix"]:
        return None
    value = json.dumps(check["expected"])
    why = ("the teacher would score the student's reply without the opening of the assistant's turn it continues"
           if check["expected"] else "the prefix adds text the student's generation prompt does not hold")
    return (f"the student's generation prompt is {json.dumps(check['student'])}, the teacher's "
            f"{json.dumps(check['teacher'])} + {check['field']} {json.dumps(check['assistant_prefix'])}: {why}; set "
            f"{check['field']}: {value} (in YAML; --set '{check['field']}={value}')")

@contextmanager
def using(config: Config, session: Session | None):
    """The caller's session, or a new one that is closed when the stage is done."""
    if session is not None:
        yield session
        return
    with Session(config) as own:
        yield own
