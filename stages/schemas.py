"""Every dataset kd writes, declared once with a version. Writers pass these; readers check them.

Token ids are int32, logprobs float32. A row of `rollouts` is one sample, with its prompt as the
student saw it (`prompt_token_ids`) and, for a chat prompt, the conversation itself
(`prompt_messages`, JSON), its reference `answer` and the `teacher` it is routed to; `scored` adds
the prompt as that teacher saw it (`teacher_prompt_token_ids`: the teacher's own chat template; the
student's ids for a plain prompt), the teacher's logprob of each completion token, the task
verifier's `reward` (kd.stages.tasks) and, when score.top_k = K > 0, the teacher's K most
likely tokens at each completion position, flattened position-major (T x K values; empty for
K = 0; K is in the manifest's stats); `eval` is rollouts plus the teacher's logprobs and which
decoding made the row.
Bump a version whenever a schema changes: readers refuse other versions with a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class DatasetKind:
    name: str
    version: int
    schema: pa.Schema | None  # None: the directory holds files (an adapter), no Arrow parts


_ROLLOUT_FIELDS = [
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("prompt_messages", pa.string()),  # the chat as JSON; null for a plain `prompt` string
    pa.field("completion_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("sampler_logprobs", pa.list_(pa.float32()), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("completion_text", pa.string(), nullable=False),
    pa.field("policy_version", pa.int32(), nullable=False),
    pa.field("answer", pa.string()),  # null when the prompt has no reference answer (a mapping: as JSON)
    pa.field("teacher", pa.string(), nullable=False),  # the teacher the prompt is routed to (score.route_by)
]
_TEACHER_FIELDS = [
    pa.field("teacher_prompt_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("teacher_logprobs", pa.list_(pa.float32()), nullable=False),
    pa.field("reward", pa.float32()),  # the task verifier's reward in [0, 1]; null when there is no answer
]

_TOP_K_FIELDS = [
    pa.field("teacher_top_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("teacher_top_logprobs", pa.list_(pa.float32()), nullable=False),
]

ROLLOUTS = DatasetKind("rollouts", 3, pa.schema(_ROLLOUT_FIELDS))
SCORED = DatasetKind("scored", 4, pa.schema(_ROLLOUT_FIELDS + _TEACHER_FIELDS + _TOP_K_FIELDS))
EVAL = DatasetKind(
    "eval", 3, pa.schema(_ROLLOUT_FIELDS + _TEACHER_FIELDS + [pa.field("decoding", pa.string(), nullable=False)])
)
TRAIN_STEPS = DatasetKind(
    "train",
    2,
    pa.schema(
        [
            pa.field("step", pa.int32(), nullable=False),  # optimiser step within the epoch, from 1
            pa.field("global_step", pa.int32(), nullable=False),
            pa.field("loss", pa.float32()),
            pa.field("grad_norm", pa.float32()),
            pa.field("learning_rate", pa.float32()),
            pa.field("tokens", pa.int64()),
            pa.field("teacher_kl", pa.float32()),
            pa.field("mismatch", pa.float32()),  # mean |s_t - b_t|: sampler vs the trainer's logprob of that policy
            pa.field("entropy", pa.float32()),
            pa.field("ratio_mean", pa.float32()),
            pa.field("ratio_max", pa.float32()),
            pa.field("clip_fraction", pa.float32()),
            # the off-policy weights pi_old / mu before train.is_correction, and the share it changed
            pa.field("is_weight_p50", pa.float32()),
            pa.field("is_weight_p99", pa.float32()),
            pa.field("is_weight_max", pa.float32()),
            pa.field("is_corrected_fraction", pa.float32()),
            pa.field("staleness", pa.int32()),  # epoch minus the sampling policy's version
        ]
    ),
)
ADAPTER = DatasetKind("adapter", 1, None)

KINDS = {kind.name: kind for kind in (ROLLOUTS, SCORED, EVAL, TRAIN_STEPS, ADAPTER)}
