"""Served engines over several URLs: requests spread round the servers, a down server skipped with one
warning, the served model checked against the configured one, timeouts that grow with the tokens asked.

The servers here are tiny HTTP servers in a thread answering in vLLM's wire format (GET /v1/models,
POST /v1/completions, POST /v1/load_lora_adapter: the answers kd reads, shaped as vLLM 0.32's
entrypoints/openai writes them) and, for SGLang's model check, in SGLang's (GET /model_info, as
sglang/srt/entrypoints/http_server.py 0.5.23 writes it): SGLang needs CUDA and cannot run on this
machine. The same checks against a real vLLM server are in tests/test_vllm.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kd.stages.config import EngineConfig
from kd.stages.engines.http import same_model
from kd.stages.engines.sglang import SGLangServerEngine
from kd.stages.engines.vllm import VLLMServerEngine
from kd.stages.errors import KdError


class FakeVLLM:
    """Answers as a vLLM server of `served` (its --model; `name`: its --served-model-name) started with
    --max-logprobs `max_logprobs` would, each completion after `delay` seconds, on `port` (0: any free
    one); it records the path of every GET and the (path, body) of every POST. `keeps_adapters` False:
    it forgets each adapter as soon as it has loaded it, as if it restarted after every load;
    `malformed`: its completions lack their fields."""

    def __init__(self, served: str, name: str | None = None, delay: float = 0.0, port: int = 0,
                 max_logprobs: int = 20, keeps_adapters: bool = True):
        self.served, self.name, self.delay, self.max_logprobs = served, name or served, delay, max_logprobs
        self.keeps_adapters, self.malformed = keeps_adapters, False
        self.gets: list[str] = []
        self.posts: list[tuple[str, dict]] = []
        self.adapters: dict[str, str] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def answer(self, status: int, payload) -> None:
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                fake.gets.append(self.path)
                if self.path != "/v1/models":
                    return self.answer(404, {})
                adapters = [{"id": name, "root": path, "parent": fake.name} for name, path in fake.adapters.items()]
                self.answer(200, {"object": "list", "data": [{"id": fake.name, "root": fake.served, "parent": None}, *adapters]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.posts.append((self.path, body))
                if self.path == "/v1/load_lora_adapter":
                    if fake.keeps_adapters:
                        fake.adapters[body["lora_name"]] = body["lora_path"]
                    return self.answer(200, f"Success: LoRA adapter '{body['lora_name']}' added successfully.")
                if body["model"] not in (fake.name, *fake.adapters):  # as vLLM's OpenAIServingModels refuses it
                    return self.answer(404, {"error": {"message": f"The model `{body['model']}` does not exist.",
                                                       "type": "NotFoundError", "param": "model", "code": 404}})
                if body.get("prompt_logprobs", 0) > fake.max_logprobs:  # as vLLM's SamplingParams refuses it
                    return self.answer(400, {"error": {"message": f"Requested prompt logprobs of "
                                                       f"{body['prompt_logprobs']}, which is greater than max allowed: "
                                                       f"{fake.max_logprobs}", "type": "BadRequestError", "code": 400}})
                time.sleep(fake.delay)
                if fake.malformed:
                    return self.answer(200, {"choices": [{}]})
                if "prompt_logprobs" in body:
                    entries = [None] + [{str(t): {"logprob": -1.0, "rank": 1}} for t in body["prompt"][1:]]
                    return self.answer(200, {"choices": [{"prompt_logprobs": entries}]})
                n = body["max_tokens"]
                self.answer(200, {"choices": [{"token_ids": [5] * n, "logprobs": {"token_logprobs": [-0.5] * n},
                                               "finish_reason": "length"}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def completions(self) -> int:
        return sum(path == "/v1/completions" for path, _ in self.posts)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fakes():
    started: list[FakeVLLM] = []

    def start(*args, **kwargs) -> FakeVLLM:
        started.append(FakeVLLM(*args, **kwargs))
        return started[-1]

    yield start
    for fake in started:
        fake.close()


def closed_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def vllm_engine(servers, model: str, **extra) -> VLLMServerEngine:
    return VLLMServerEngine(EngineConfig(kind="vllm", server=servers, **{"max_retries": 0, **extra}), model, [0])


SEQUENCES, STARTS = [[1, 2, 3, 4]] * 8, [2] * 8


def test_requests_go_round_the_servers(fakes):
    a, b = fakes("teacher"), fakes("teacher")
    engine = vllm_engine([a.url, b.url], "teacher", concurrency=1)
    scores = engine.score(SEQUENCES, STARTS)
    assert [s.logprobs.tolist() for s in scores] == [[-1.0, -1.0]] * 8
    assert (a.completions(), b.completions()) == (4, 4)
    assert a.gets == b.gets == ["/v1/models"]  # each model checked once, the first when the engine is made


def test_a_down_server_is_skipped_with_one_warning(fakes, tmp_path, capsys, monkeypatch):
    live, down = fakes("student"), closed_url()
    adapter = tmp_path / "0000" / "adapter"
    adapter.mkdir(parents=True)
    engine = vllm_engine([down, live.url], "student", concurrency=2)
    assert len(engine.score(SEQUENCES, STARTS)) == 8
    monkeypatch.setattr("kd.stages.engines.http.DOWN_SECONDS", 0.0)  # tried again at its every turn: still one warning
    for _ in range(2):
        assert len(engine.score(SEQUENCES, STARTS)) == 8
    completions = engine.sample([[1, 2]] * 4, list(range(4)), sampling(3), adapter)
    assert [c.token_ids for c in completions] == [[5, 5, 5]] * 4
    assert live.completions() == 3 * 8 + 4
    assert [path for path, _ in live.posts].count("/v1/load_lora_adapter") == 1  # loaded where it samples
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kd: warning")]
    assert len(warnings) == 1 and down in warnings[0] and "the other servers take its requests" in warnings[0]


def test_each_server_loads_an_adapter_before_sampling_with_it(fakes, tmp_path):
    a, b = fakes("student"), fakes("student", name="student-served-name")
    adapter = tmp_path / "0003" / "adapter"
    adapter.mkdir(parents=True)
    engine = vllm_engine([a.url, b.url], "student", concurrency=1)
    engine.sample([[1, 2]] * 4, list(range(4)), sampling(2), adapter)
    for fake in (a, b):
        loads = [body["lora_name"] for path, body in fake.posts if path == "/v1/load_lora_adapter"]
        asked = {body["model"] for path, body in fake.posts if path == "/v1/completions"}
        assert len(loads) == 1 and asked == set(loads) and fake.completions() == 2
    engine.score(SEQUENCES[:2], STARTS[:2])  # the base model, by the name each server gives it
    assert b.posts[-1][1]["model"] == "student-served-name" and a.posts[-1][1]["model"] == "student"


def test_a_restarted_server_gets_its_adapter_loaded_again(fakes, tmp_path, capsys):
    """A vLLM server restarted between two requests has lost the adapters loaded at run time, and answers
    HTTP 404 "The model `kd-...` does not exist." for kd's name: kd loads the adapter again there and
    sends the request once more, with no retry (max_retries 0) and no warning."""
    server = fakes("student")
    adapter = tmp_path / "0002" / "adapter"
    adapter.mkdir(parents=True)
    engine = vllm_engine(server.url, "student", concurrency=2)
    assert [c.token_ids for c in engine.sample([[1, 2]] * 4, list(range(4)), sampling(2), adapter)] == [[5, 5]] * 4
    server.adapters.clear()  # the restart
    assert [c.token_ids for c in engine.sample([[1, 2]] * 4, list(range(4)), sampling(2), adapter)] == [[5, 5]] * 4
    loads = [body["lora_name"] for path, body in server.posts if path == "/v1/load_lora_adapter"]
    assert len(loads) == 2 and loads[0] != loads[1] and list(server.adapters) == [loads[1]]
    assert {body["model"] for path, body in server.posts[-4:]} == {loads[1]}  # all sent again, by the new name
    assert "kd: warning" not in capsys.readouterr().err


def test_a_server_that_keeps_losing_its_adapter_fails_over_to_another(fakes, tmp_path, capsys):
    lossy, steady = fakes("student", keeps_adapters=False), fakes("student")
    adapter = tmp_path / "0002" / "adapter"
    adapter.mkdir(parents=True)
    engine = vllm_engine([lossy.url, steady.url], "student", concurrency=1)
    assert len(engine.sample([[1, 2]] * 4, list(range(4)), sampling(2), adapter)) == 4
    assert steady.completions() == 4 and lossy.completions() == 2  # sent once, then once more after loading again
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kd: warning")]
    assert len(warnings) == 1 and lossy.url in warnings[0] and "does not exist" in warnings[0]


def test_a_server_that_failed_is_checked_and_loaded_again_when_it_returns(fakes, tmp_path):
    """kd forgets what it knew of a server that failed: back on the same port, it has its model checked
    again and kd's adapter loaded before its first request (no 404 first), and one that came back with
    another model under the same name is refused."""
    first = fakes("/models/student", name="student")
    adapter = tmp_path / "0002" / "adapter"
    adapter.mkdir(parents=True)
    engine = vllm_engine(first.url, "/models/student")
    engine.sample([[1, 2]], [0], sampling(2), adapter)
    first.close()
    with pytest.raises(KdError, match="unreachable after 1 tries"):
        engine.sample([[1, 2]], [0], sampling(2), adapter)
    back = fakes("/models/student", name="student", port=first.port)
    assert len(engine.sample([[1, 2]], [0], sampling(2), adapter)) == 1
    assert back.gets == ["/v1/models"] and [path for path, _ in back.posts] == ["/v1/load_lora_adapter", "/v1/completions"]
    back.close()
    with pytest.raises(KdError, match="unreachable after 1 tries"):
        engine.score(SEQUENCES[:1], STARTS[:1])
    other = fakes("/models/other", name="student", port=first.port)
    with pytest.raises(KdError, match=f"vLLM server {other.url} serves student or /models/other, not /models/student"):
        engine.score(SEQUENCES[:1], STARTS[:1])
    assert other.completions() == 0


def test_errors_name_the_server_that_answered(fakes):
    good, bad = fakes("teacher"), fakes("teacher", max_logprobs=0)
    engine = vllm_engine([good.url, bad.url], "teacher", concurrency=1)
    with pytest.raises(KdError) as err:
        engine.score(SEQUENCES, STARTS, top_k=1)
    assert str(err.value) == (f"vLLM server {bad.url}: scoring needs 1 prompt logprobs per position (score.top_k = 1), "
                              "more than the server allows; restart it with --max-logprobs 1")
    bad.max_logprobs, bad.malformed = 20, True
    with pytest.raises(KdError) as err:
        engine.score(SEQUENCES, STARTS)
    assert str(err.value).startswith(f"vLLM server {bad.url}: malformed prompt_logprobs answer (")


def test_every_server_down_is_one_line_naming_them_all(capsys):
    first, second = closed_url(), closed_url()
    with pytest.raises(KdError) as err:
        vllm_engine([first, second], "teacher", max_retries=1)
    assert "kd: warning" not in capsys.readouterr().err  # no other server took their requests
    message = str(err.value)
    assert "\n" not in message and first in message and second in message
    assert "every one unreachable after 2 tries each" in message and "check that `vllm serve` runs there" in message


def test_a_server_of_another_model_is_refused_naming_both(fakes):
    other = fakes("runs/toy-world/student")
    with pytest.raises(KdError) as err:
        vllm_engine(other.url, "runs/toy-world/teacher")
    assert str(err.value) == (
        f"vLLM server {other.url} serves runs/toy-world/student, not runs/toy-world/teacher (the configured model); "
        "point engine.server at a server of runs/toy-world/teacher, or, if it serves that model under another name, "
        "set engine.served_model: runs/toy-world/student")
    # The way out the error names: the server's name for the same model.
    named = fakes("/models/qwen3-32b", name="teacher-32b")
    engine = vllm_engine(named.url, "Qwen/Qwen3-32B", served_model="teacher-32b")
    engine.score(SEQUENCES[:1], STARTS[:1])
    assert named.posts[-1][1]["model"] == "teacher-32b"
    with pytest.raises(KdError, match=r"serves teacher-32b or /models/qwen3-32b, not Qwen/Qwen3-32B \(the configured"):
        vllm_engine(named.url, "Qwen/Qwen3-32B")


def test_a_second_server_of_another_model_is_refused_before_its_first_request(fakes):
    right, wrong = fakes("teacher"), fakes("student")
    engine = vllm_engine([right.url, wrong.url], "teacher", concurrency=1)
    with pytest.raises(KdError, match=f"vLLM server {wrong.url} serves student, not teacher"):
        engine.score(SEQUENCES, STARTS)
    assert wrong.completions() == 0


def test_the_served_model_matches_by_directory_or_by_exact_name(tmp_path, monkeypatch):
    teacher = tmp_path / "runs" / "toy-world" / "teacher"
    teacher.mkdir(parents=True)
    (tmp_path / "link").symlink_to(teacher)
    monkeypatch.chdir(tmp_path)
    assert same_model(str(teacher), "runs/toy-world/teacher")  # served absolute, configured relative
    assert same_model("./runs/toy-world/teacher/", "runs/toy-world/teacher")
    assert same_model(str(tmp_path / "link"), "runs/toy-world/teacher")
    assert same_model("Qwen/Qwen3-32B", "Qwen/Qwen3-32B")
    assert not same_model("Qwen/Qwen3-8B", "Qwen/Qwen3-32B")
    assert not same_model("runs/toy-world/student", "runs/toy-world/teacher")
    assert not same_model(str(teacher), "teacher")  # a name is not the directory of that name elsewhere


def test_a_server_started_with_the_absolute_path_serves_the_relative_one(fakes, tmp_path, monkeypatch):
    (tmp_path / "runs" / "toy-world" / "teacher").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    server = fakes(str(tmp_path / "runs" / "toy-world" / "teacher"))
    engine = vllm_engine(server.url, "runs/toy-world/teacher")
    engine.score(SEQUENCES[:1], STARTS[:1])
    assert server.posts[-1][1]["model"] == str(tmp_path / "runs" / "toy-world" / "teacher")


def test_the_timeout_grows_with_the_tokens_asked(fakes):
    """A completion the server takes 0.6 s for: cut at request_timeout 0.2 s alone, finished when each of
    its 11 tokens (3 sent, 8 asked) adds 0.2 s."""
    slow = fakes("student", delay=0.6)
    cut = vllm_engine(slow.url, "student", request_timeout=0.2, seconds_per_token=0.0)
    with pytest.raises(KdError, match=r"unreachable after 1 tries \(timed out\); .*raise engine.seconds_per_token"):
        cut.sample([[1, 2, 3]], [0], sampling(8), None)
    scaled = vllm_engine(slow.url, "student", request_timeout=0.2, seconds_per_token=0.2)
    assert len(scaled.sample([[1, 2, 3]], [0], sampling(8), None)[0].token_ids) == 8


def sampling(max_new_tokens: int):
    from kd.stages.engines import SamplingParams

    return SamplingParams(max_new_tokens)


class FakeSGLang:
    """Answers GET /model_info as SGLang 0.5.23's http_server.py does (model_path, served_model_name)."""

    def __init__(self, model_path: str, served_model_name: str | None = None):
        info = {"model_path": model_path, "served_model_name": served_model_name or model_path, "is_generation": True}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def do_GET(self):
                data = json.dumps(info).encode()
                self.send_response(200 if self.path == "/model_info" else 404)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_sglang_model_info_is_checked(tmp_path, monkeypatch):
    (tmp_path / "teacher").mkdir()
    monkeypatch.chdir(tmp_path)
    servers = [FakeSGLang(str(tmp_path / "teacher")), FakeSGLang("Qwen/Qwen3-8B"), FakeSGLang("/models/q", "qwen-32b")]
    try:
        def engine(url: str, model: str, **extra):
            return SGLangServerEngine(EngineConfig(kind="sglang", server=url, max_retries=0, **extra), model, [0])

        assert engine(servers[0].url, "teacher").served == {servers[0].url: str(tmp_path / "teacher")}
        with pytest.raises(KdError, match=f"SGLang server {servers[1].url} serves Qwen/Qwen3-8B, not Qwen/Qwen3-32B "
                                          r"\(the configured model\); .* set engine.served_model: Qwen/Qwen3-8B"):
            engine(servers[1].url, "Qwen/Qwen3-32B")
        assert engine(servers[2].url, "Qwen/Qwen3-32B", served_model="qwen-32b").served == {servers[2].url: "/models/q"}
        with pytest.raises(KdError, match=r"serves /models/q or qwen-32b, not other \(engine.served_model\)"):
            engine(servers[2].url, "Qwen/Qwen3-32B", served_model="other")
    finally:
        for server in servers:
            server.server.shutdown()
            server.server.server_close()


def test_a_server_list_is_read_from_yaml_and_one_url_still_works():
    from kd.stages import config as config_lib

    listed = config_lib.load(None, ["score.engine.kind=vllm", "score.engine.server=[http://a:8001, http://b:8001/]"])
    assert listed.score.engine.servers() == ["http://a:8001", "http://b:8001"]
    assert config_lib.to_yaml(listed).count("- http://") == 2  # written back as the list it was
    one = config_lib.load(None, ["score.engine.kind=vllm", "score.engine.server=http://a:8001"])
    assert one.score.engine.server == "http://a:8001" and one.score.engine.servers() == ["http://a:8001"]


@pytest.mark.parametrize("override, message", [
    ("score.engine.server=[]", "config field score.engine.server: an empty list"),
    ("score.engine.server=[http://127.0.0.1:8001, http://127.0.0.1:8001]", "a URL is listed twice"),
    ("score.engine.server=[http://127.0.0.1:8001, http://127.0.0.1:8001/]", "a URL is listed twice"),
    ("score.engine.server=127.0.0.1:8001", "'127.0.0.1:8001' is not an http:// or https:// URL"),
    ("score.engine.server=[8001]", "config field score.engine.server[0]: expected str, got 8001"),
])
def test_bad_server_lists_are_refused(override, message):
    from kd.stages import config as config_lib

    with pytest.raises(KdError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_lib.load(None, ["score.engine.kind=vllm", override])

