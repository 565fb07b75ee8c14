"""The SGLang engine, tested as far as this machine allows.

SGLang needs CUDA (its CPU backend needs AVX-512): no SGLang server can start here. So:
- the contract: every request body kd builds is checked against the fields of SGLang's own request
  classes (GenerateReqInput, SamplingParams, Load/UnloadLoRAAdapterReqInput), read with `ast` from
  the sources in SGLang's wheel (fetched with `pip download --no-deps`, never installed: importing
  it needs CUDA builds), pinned to the version the engine's facts were read in; and the answer keys
  and the None-first convention kd relies on are looked up in the same sources;
- the wire format: a stand-in HTTP server on 127.0.0.1 answers /generate as SGLang's code shapes its
  answers, from a real hf scoring or sampling of the same tokens. It stands in for the wire format
  only: it checks each body against the contract and computes nothing SGLang would not;
- a real SGLang server on a GPU: `test_real_sglang_server_scores_like_hf`, skipped here; with a GPU,
  `pip install -e ".[sglang]" && python -m pytest tests/test_sglang.py -k real_sglang`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.stages import datasets_io, generate, pipeline, rundir, score
from kd.stages.config import EngineConfig
from kd.stages.engines import SamplingParams
from kd.stages.engines.hf import HFEngine
from kd.stages.engines.sglang import (SGLANG_VERSION, SGLangServerEngine, build, completion_from, sample_request,
                                     score_request)
from kd.stages.errors import KdError
from kd.stages.schemas import SCORED
from kd.stages.session import Session, load_tokenizer, stop_token_ids

SOURCES = {
    "api_types": "sglang/api/v1/api_types.py",
    "io_struct": "sglang/srt/managers/io_struct.py",
    "sampling_params": "sglang/srt/sampling/sampling_params.py",
    "tokenizer_manager": "sglang/srt/managers/tokenizer_manager.py",
    "logprob_result_processor": "sglang/srt/managers/scheduler_components/logprob_result_processor.py",
}


@pytest.fixture(scope="session")
def sglang_source() -> dict[str, str]:
    """The source files of SGLang's wheel that define its request and answer (cached between runs)."""
    cache = Path(os.environ.get("KD_TEST_CACHE", Path.home() / ".cache" / "kd-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
    if not wheels:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(cache),
             f"sglang=={SGLANG_VERSION}"], capture_output=True, text=True,
        )
        wheels = sorted(cache.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
        if not wheels:
            pytest.skip(f"cannot download SGLang {SGLANG_VERSION}'s wheel from the package index: "
                        f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        return {name: wheel.read(member).decode() for name, member in SOURCES.items()}


def class_fields(source: str, name: str) -> dict[str, bool]:
    """{field: required} of a dataclass or msgspec.Struct class in `source`, from its annotations."""
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == name)
    return {item.target.id: item.value is None for item in node.body
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}


def http_schema(source: dict[str, str]):
    """SGLang's /generate gate (sglang/api/v1/api_types.py, which needs only msgspec), run as its code."""
    module = sys.modules.get("sglang_api_types")
    if module is None:
        module = types.ModuleType("sglang_api_types")
        sys.modules[module.__name__] = module  # msgspec resolves the annotations in the class's module
        exec(compile(source["api_types"], "sglang/api/v1/api_types.py", "exec"), module.__dict__)
    return module


def check_contract(body: dict, source: dict[str, str]) -> None:
    """`body` passes the /generate gate's decoding (types, sampling fields) and names only fields of
    the request class the server builds from it (the gate lets unknown top-level fields through)."""
    http_schema(source).GenerateRequest.from_json_value(body)
    generate_fields = class_fields(source["io_struct"], "GenerateReqInput")
    sampling_fields = class_fields(source["sampling_params"], "SamplingParams")
    assert set(body) <= set(generate_fields), set(body) - set(generate_fields)
    assert set(body.get("sampling_params", {})) <= set(sampling_fields), set(body["sampling_params"]) - set(sampling_fields)


PARAMS = [SamplingParams(16), SamplingParams(16, temperature=0.7), SamplingParams(16, greedy=True)]


def test_every_request_kd_builds_is_in_sglangs_own_request_classes(sglang_source):
    for params in PARAMS:
        for adapter in (None, "kd-run-0003-1"):
            check_contract(sample_request([1, 2, 3], 7, params, [0, 5], adapter), sglang_source)
    for top_k in (0, 5):
        check_contract(score_request([1, 2, 3, 4], 2, top_k), sglang_source)
    load = class_fields(sglang_source["io_struct"], "LoadLoRAAdapterReqInput")
    unload = class_fields(sglang_source["io_struct"], "UnloadLoRAAdapterReqInput")
    assert {name for name, required in load.items() if required} == {"lora_name", "lora_path"}
    assert {name for name, required in unload.items() if required} == {"lora_name"}
    # The answer's keys kd reads, as SGLang's tokenizer manager writes them.
    for key in ("input_token_logprobs", "output_token_logprobs", "input_top_logprobs"):
        assert f'meta_info["{key}"]' in sglang_source["tokenizer_manager"], key
    # A body the gate refuses (an unknown sampling field) does fail the check.
    with pytest.raises(Exception, match="unknown field `seed`"):
        check_contract({**score_request([1, 2, 3], 2, 0), "sampling_params": {"seed": 1}}, sglang_source)
    # The first input logprob (and top logprobs) from logprob_start_len is None: kd drops it.
    assert "[None] + input_token_logprobs[:-1]" in sglang_source["logprob_result_processor"]
    assert "else [None]" in sglang_source["logprob_result_processor"]
    assert "x if x < self.model_config.vocab_size - 1 else 0" in sglang_source["logprob_result_processor"]


class StandIn:
    """An HTTP server on 127.0.0.1 answering SGLang's /generate wire format from hf engines (see the
    module docstring); it records the requests it got."""

    def __init__(self, teacher: HFEngine, student: HFEngine, source: dict[str, str], vocab_size: int, model_path: str):
        self.teacher, self.student, self.source, self.vocab_size = teacher, student, source, vocab_size
        self.model_path = model_path  # what /model_info says it serves (it samples and scores from both models)
        self.deterministic = True  # --enable-deterministic-inference
        self.requests: list[tuple[str, dict]] = []
        self.adapters: dict[str, Path] = {}
        self.violations: list[str] = []  # bodies outside SGLang's request classes (answered with HTTP 422)
        self.malformed = False
        self.lock = threading.Lock()  # kd sends requests in parallel; an hf engine serves one at a time
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def answer(self, status: int, payload) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/model_info":
                    self.answer(200, {"model_path": stand_in.model_path, "served_model_name": stand_in.model_path,
                                      "is_generation": True})
                elif self.path == "/server_info":
                    self.answer(200, {"enable_deterministic_inference": stand_in.deterministic, "context_length": 256})
                else:
                    self.answer(404, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stand_in.lock:
                    stand_in.requests.append((self.path, body))
                    status, payload = stand_in.handle(self.path, body)
                self.answer(status, payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, path: str, body: dict) -> tuple[int, dict]:
        if path == "/load_lora_adapter":
            self.adapters[body["lora_name"]] = Path(body["lora_path"])
            return 200, {"success": True, "loaded_adapters": {}}
        if path == "/unload_lora_adapter":
            if self.adapters.pop(body["lora_name"], None) is None:  # as lora_registry.py answers an unknown name
                return 400, {"success": False, "error_message": f"LoRA adapter {body['lora_name']} does not exist"}
            return 200, {"success": True}
        if path != "/generate":
            return 404, {"error": path}
        if "input_ids" not in body:
            return 400, {"error": "input_ids is required"}
        if body.get("lora_path") not in (None, *self.adapters):  # as tokenizer_manager.py refuses it
            return 400, {"error": {"message": f"Got LoRA adapter that has never been loaded: {body['lora_path']}\n"
                                              f"All loaded adapters: {self.adapters.keys()}."}}
        try:
            check_contract(body, self.source)
        except AssertionError as err:
            self.violations.append(str(err))
            return 422, {"error": f"not in SGLang's request classes: {err}"}
        if self.malformed:
            return 200, {"meta_info": {"finish_reason": {"type": "stop"}}}
        if "logprob_start_len" in body:
            return 200, self.scored(body)
        return 200, self.sampled(body)

    def scored(self, body: dict) -> dict:
        ids, start, top_k = body["input_ids"], body["logprob_start_len"], body.get("top_logprobs_num", 0)
        (scores,) = self.teacher.score([ids], [start + 1], top_k=top_k)
        # SGLang reports input ids >= vocab_size - 1 as 0 (logprob_result_processor.py)
        shown = [t if t < self.vocab_size - 1 else 0 for t in ids]
        tokens = [[None, shown[start], None]] + [[float(lp), t, None] for lp, t in zip(scores.logprobs, shown[start + 1:])]
        meta = {"finish_reason": {"type": "length", "length": 1}, "input_token_logprobs": tokens}
        if top_k:
            meta["input_top_logprobs"] = [None] + [
                [[float(lp), int(t), None] for lp, t in zip(lps, top_ids)]
                for lps, top_ids in zip(scores.top_logprobs, scores.top_ids)
            ]
        return {"text": "", "output_ids": [0], "meta_info": meta}

    def sampled(self, body: dict) -> dict:
        sampling = body["sampling_params"]
        params = SamplingParams(sampling["max_new_tokens"], sampling["temperature"] or 1.0, sampling["top_p"],
                                greedy=sampling["temperature"] == 0)
        adapter = self.adapters[body["lora_path"]] if "lora_path" in body else None
        (done,) = self.student.sample([body["input_ids"]], [sampling["sampling_seed"]], params, adapter)
        entries = [[float(lp), t, None] for lp, t in zip(done.logprobs, done.token_ids)]
        finish = {"type": "stop", "matched": done.token_ids[-1]} if done.finish_reason == "stop" else \
            {"type": "length", "length": len(done.token_ids)}
        meta = {"finish_reason": finish, "output_token_logprobs": entries}
        return {"text": "", "output_ids": done.token_ids, "meta_info": meta}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in(make_config, sglang_source):
    config = make_config()
    tokenizer = load_tokenizer(config.student)
    engines = [HFEngine.load(path, stop_token_ids(tokenizer, path), tokenizer.pad_token_id, dtype="float32", device="cpu")
               for path in (config.teacher, config.student)]
    from transformers import AutoConfig

    server = StandIn(*engines, sglang_source, AutoConfig.from_pretrained(config.teacher).vocab_size, str(config.teacher))
    yield server, config, engines
    server.close()
    assert server.violations == []


def engine_config(url: str, **extra) -> EngineConfig:
    return EngineConfig(kind="sglang", server=url, **extra)


def test_scores_over_the_wire_equal_the_scorers_own(stand_in):
    server, config, (teacher, _) = stand_in
    tokenizer = load_tokenizer(config.student)
    engine = SGLangServerEngine(engine_config(server.url), server.model_path, stop_token_ids(tokenizer, config.teacher),
                                server.vocab_size)
    last = server.vocab_size - 1  # reported as 0 by SGLang, and still accepted
    sequences = [[1, 5, 9, 12, 30, 31, 32], [4, 8, 15, 16, last, 42], [7, 7, 9]]
    starts = [3, 2, 3]  # the last has no completion token
    for top_k in (0, 5):
        got = engine.score(sequences, starts, top_k=top_k)
        # The stand-in scores each request alone, as a server may batch it with anything.
        want = [teacher.score([sequence], [start], top_k=top_k)[0] for sequence, start in zip(sequences, starts)]
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.logprobs, w.logprobs)
            np.testing.assert_array_equal(g.top_ids, w.top_ids)
            np.testing.assert_array_equal(g.top_logprobs, w.top_logprobs)
    starts_sent = {tuple(body["input_ids"]): body["logprob_start_len"] for path, body in server.requests if path == "/generate"}
    assert starts_sent == {tuple(sequence): start - 1 for sequence, start in zip(sequences, starts)}
    strict = SGLangServerEngine(engine_config(server.url), server.model_path, [0])  # not told the vocabulary: the 0 is a wrong token
    with pytest.raises(KdError, match="name other tokens than the sequence's"):
        strict.score(sequences[1:2], starts[1:2])


@pytest.mark.parametrize("params", PARAMS, ids=["T=1", "T=0.7", "greedy"])
def test_samples_and_their_behaviour_logprobs_over_the_wire(stand_in, params):
    server, config, (_, student) = stand_in
    tokenizer = load_tokenizer(config.student)
    stops = stop_token_ids(tokenizer, config.student)
    engine = SGLangServerEngine(engine_config(server.url), server.model_path, stops)
    prompts, seeds = [[1, 5, 9], [4, 8, 15, 16]], [11, 2**62 + 5]
    got = engine.sample(prompts, seeds, params, adapter=None)
    want = [student.sample([prompt], [seed], params, adapter=None)[0] for prompt, seed in zip(prompts, seeds)]
    assert [(c.token_ids, c.logprobs, c.finish_reason) for c in got] == [(c.token_ids, c.logprobs, c.finish_reason) for c in want]
    body = next(body for path, body in server.requests if path == "/generate")
    assert body["sampling_params"]["stop_token_ids"] == stops and "lora_path" not in body


def test_sampling_needs_a_seeded_server_and_a_whole_completion(stand_in):
    server, config, _ = stand_in
    engine = SGLangServerEngine(engine_config(server.url), server.model_path, [0])
    server.deterministic = False
    with pytest.raises(KdError, match="without --enable-deterministic-inference, so it ignores sampling_seed"):
        engine.sample([[1, 5, 9]], [3], SamplingParams(8), None)
    server.deterministic = True
    cut = {"meta_info": {"finish_reason": {"type": "length", "length": 3}, "output_token_logprobs": [[-1.0, 5, None]] * 3}}
    with pytest.raises(KdError, match="stopped a completion at 3 of max_new_tokens = 8 tokens"):
        completion_from(cut, SamplingParams(8))
    aborted = {"meta_info": {"finish_reason": {"type": "abort", "message": "queue full"}, "output_token_logprobs": []}}
    with pytest.raises(KdError, match="aborted a sample: queue full"):
        completion_from(aborted, SamplingParams(8))


def test_each_adapter_is_loaded_under_a_new_name_and_the_old_one_unloaded(stand_in, tmp_path):
    from kd.stages.policy import Policy
    from kd.stages.train import save_adapter

    server, config, (_, student) = stand_in
    tokenizer = load_tokenizer(config.student)
    adapters = []
    policy = Policy(config)
    for index in range(2):  # two epochs' adapters: the fresh LoRA moved off zero, twice
        policy.load(None)
        for weight in policy.trainable.values():
            weight.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(index))
        save_adapter(policy, tmp_path / f"{index}" / "adapter")
        adapters.append(tmp_path / f"{index}" / "adapter")
    engine = SGLangServerEngine(engine_config(server.url), server.model_path, stop_token_ids(tokenizer, config.student))
    params = SamplingParams(8)
    for adapter in adapters:
        got = engine.sample([[1, 5, 9]], [3], params, adapter)
        want = student.sample([[1, 5, 9]], [3], params, adapter)
        assert got[0].token_ids == want[0].token_ids and got[0].logprobs == want[0].logprobs
    calls = [(path, body.get("lora_name")) for path, body in server.requests if path != "/generate"]
    assert [path for path, _ in calls] == ["/load_lora_adapter", "/load_lora_adapter", "/unload_lora_adapter"]
    assert calls[0][1] != calls[1][1] and calls[2][1] == calls[0][1]  # the first epoch's adapter went
    assert [body["lora_path"] for path, body in server.requests if path == "/generate"] == [calls[0][1], calls[1][1]]
    server.adapters.clear()  # the server restarted: it has never loaded kd's adapter, so kd loads it again
    again = engine.sample([[1, 5, 9]], [3], params, adapters[1])
    assert again[0].token_ids == got[0].token_ids and again[0].logprobs == got[0].logprobs
    assert [path for path, _ in server.requests[-3:]] == ["/generate", "/load_lora_adapter", "/generate"]
    reloaded = server.requests[-2][1]["lora_name"]
    assert reloaded not in (calls[0][1], calls[1][1]) and server.requests[-1][1]["lora_path"] == reloaded
    server.adapters.clear()  # the server evicted it (--max-loaded-loras) or restarted: unloading is best effort
    engine.close()
    assert server.requests[-1][0] == "/unload_lora_adapter" and engine._adapters == {}


def test_kd_score_against_sglang_writes_the_dataset_the_hf_engine_writes(stand_in, make_config):
    server, _, _ = stand_in
    reference = make_config(run_id="hf", **{"score.top_k": 4})
    over_the_wire = make_config(**{"run_id": "sglang", "score.engine.kind": "sglang", "score.engine.server": server.url,
                                   "score.top_k": 4})
    tables = []
    for config in (reference, over_the_wire):
        rundir.prepare(config)
        with Session(config, progress=False) as session:
            generate.run(config, 0, session)
            tables.append(datasets_io.read_table(score.run(config, 0, session), SCORED))
    for column in ("completion_token_ids", "teacher_prompt_token_ids", "teacher_top_ids"):
        assert tables[0].column(column).to_pylist() == tables[1].column(column).to_pylist(), column
    for column in ("teacher_logprobs", "teacher_top_logprobs"):  # hf scores in batches, the stand-in one at a time
        ours, theirs = (np.concatenate(t.column(column).to_pylist()) for t in tables)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5, err_msg=column)
    assert datasets_io.read_manifest(pipeline.stage_dir(over_the_wire, 0, "scored"))["config"]["score"]["engine"]["kind"] == "sglang"


def test_a_server_that_is_down_refuses_or_answers_nonsense_fails_in_one_line(stand_in):
    server, config, _ = stand_in
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(KdError, match=r"SGLang server .*/model_info: unreachable after 1 tries .*sglang.launch_server"):
        SGLangServerEngine(engine_config(closed, max_retries=0), server.model_path, [0])
    engine = SGLangServerEngine(engine_config(server.url, max_retries=0), server.model_path, [0])
    server.malformed = True
    with pytest.raises(KdError, match="malformed /generate answer to a scoring") as err:
        engine.score([[1, 2, 3]], [1])
    assert "\n" not in str(err.value)
    with pytest.raises(KdError, match="malformed /generate answer to a sample"):
        engine.sample([[1, 2, 3]], [0], SamplingParams(4), None)
    server.malformed = False
    with pytest.raises(KdError, match="HTTP 400: .*input_ids is required"):
        engine._request("POST", "/generate", {"text": "re-tokenised text is what kd never sends"})
    with pytest.raises(KdError, match="HTTP 404, no such endpoint; is this a SGLang server"):
        engine._request("GET", "/v1/models")  # a vLLM server's endpoint: the wrong engine.kind for this server


@pytest.mark.skipif(importlib.util.find_spec("sglang") is None or not torch.cuda.is_available(),
                    reason="a real SGLang server needs CUDA and `pip install sglang` (not possible on CI's CPU machines)")
def test_real_sglang_server_scores_and_samples_like_hf(make_config, tmp_path):
    """On a GPU: `pip install -e ".[sglang]" && python -m pytest tests/test_sglang.py -k real_sglang`."""
    config = make_config()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "sglang.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--model-path", config.teacher,
                                   "--port", str(port), "--dtype", "float32", "--enable-deterministic-inference"],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 600
        while True:
            try:
                engine = build(engine_config(url, max_retries=0), config.teacher, [0])
                break
            except KdError:
                assert server.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(2)
        tokenizer = load_tokenizer(config.teacher)
        teacher = HFEngine.load(config.teacher, stop_token_ids(tokenizer, config.teacher), tokenizer.pad_token_id,
                                dtype="float32", device="cuda")
        sequences, starts = [[1, 5, 9, 12, 30, 31, 32], [4, 8, 15, 16, 23, 42]], [3, 2]
        for got, want in zip(engine.score(sequences, starts, top_k=5), teacher.score(sequences, starts, top_k=5)):
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-3)
            np.testing.assert_array_equal(got.top_ids[:, 0], want.top_ids[:, 0])
        first, again = (engine.sample([[1, 5, 9]], [3], SamplingParams(16, temperature=0.7), None)[0] for _ in range(2))
        assert first.token_ids == again.token_ids  # sampling_seed is honoured
        (sampled,) = engine.sample([[1, 5, 9]], [4], SamplingParams(16), None)  # at T = 1: the model's own logprobs
        (rescored,) = teacher.score([[1, 5, 9, *sampled.token_ids]], [3])
        np.testing.assert_allclose(sampled.logprobs, rescored.logprobs, atol=1e-3)
    finally:
        os.killpg(server.pid, 15)
        server.wait(60)
