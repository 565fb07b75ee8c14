"""What the server engines share: JSON over HTTP to one server or several, with retries, timeouts,
bounded concurrency and a check of the model each server serves.

Requests go round engine.server's URLs in turn. A request that a server refuses (HTTP 4xx) fails at
once with the server's reason. A server that is down, overloaded (5xx) or slow is skipped for
DOWN_SECONDS while the others take its requests, and named in one warning once another server has
taken one; a request that every server failed is tried again with exponential backoff
(engine.max_retries), then fails with one line naming the servers and the fix. Each try may take engine.request_timeout + engine.seconds_per_token
x the request's tokens. Before its first request, a server's model is checked against the configured
one (engine.served_model, else the model kd was given for that role): a mismatch fails in one line.

A server that fails may come back restarted: with another model, without the adapters kd loaded
there. So what kd knows of a server (its checked model, what it loaded there) is forgotten when it
fails, and checked and loaded again when it next takes a request; a server that answers that it does
not know what kd asked for by name (`lost`) has restarted between two requests: kd forgets what it
knew of it and sends the request there once more, then fails over to another server.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from kd.stages.config import EngineConfig
from kd.stages.errors import KdError


DOWN_SECONDS = 60.0  # a server that failed a try gets requests again after this long: a restarted one rejoins


class Unreachable(Exception):
    """A try that another server, or a later try, may pass: no connection, HTTP 5xx, past its timeout."""


class Lost(Unreachable):
    """A server's answer that it does not know the model or adapter kd asked for: it restarted."""


class Refused(KdError):
    """A server's HTTP 4xx: the request is wrong there, and retrying cannot help. `url`: that server;
    `detail`: its reason."""

    def __init__(self, message: str, url: str, detail: str):
        super().__init__(message)
        self.url, self.detail = url, detail


def same_model(served: str, configured: str) -> bool:
    """Whether a server's model (a name or path it reports) is the configured one: the same directory
    however written (relative to kd's working directory, absolute, through a link), else the same name
    (a hub id equals only itself)."""
    if os.path.normpath(served) == os.path.normpath(configured):
        return True
    served_path, configured_path = Path(served).expanduser(), Path(configured).expanduser()
    return served_path.is_dir() and configured_path.is_dir() and served_path.resolve() == configured_path.resolve()


class ServerClient:
    """`server_name` (e.g. "vLLM server") and `start_hint` (how to start one) word its errors;
    `info_path` is where a server says which model it serves, read by the subclass's `_served_models`;
    `lost`: a pattern of what a 4xx answer says when the server does not know the model or adapter
    asked for (it restarted since kd loaded it)."""

    server_name = "server"
    start_hint = "start it"
    info_path: str
    lost: str

    def __init__(self, engine: EngineConfig, model: str):
        """`model`: the model kd was configured with for this role (teacher or student), which every
        server must serve, unless engine.served_model names what they serve. The first server that
        answers is checked now, the others before their first request."""
        self.engine = engine
        self.urls = engine.servers()
        self.expected = engine.served_model or model
        self.served: dict[str, str] = {}  # url -> the name its (checked) model is asked for by
        self._turns = itertools.count()
        self._failed_at: dict[str, float] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._url_locks = {url: threading.Lock() for url in self.urls}
        # url -> how many times kd forgot what it knew of it: a request that failed forgets what kd knew
        # when it was sent, not what a concurrent request has checked and loaded there since
        self._forgotten = dict.fromkeys(self.urls, 0)
        self._at_a_server(self.info_path, lambda url: None)  # the model check reads info_path: nothing more to ask

    def _served_models(self, info: dict) -> list[tuple[str, list[str]]]:
        """From the answer at `info_path`: each model served, as (the name requests ask it by, every
        name and path it is known by)."""
        raise NotImplementedError

    def _check_model(self, url: str) -> str:
        """The name server `url`'s model is asked for by; refuse a server that serves another model than
        the configured one (checked once until kd forgets the server)."""
        served = self.served.get(url)
        if served is not None:
            return served
        with self._url_locks[url]:
            if url in self.served:
                return self.served[url]
            info = self._send(url, "GET", self.info_path, None, True, self.engine.request_timeout)
            try:
                models = self._served_models(info)
            except (KeyError, IndexError, TypeError, AttributeError) as err:
                raise KdError(f"{self.server_name} {url}{self.info_path}: malformed answer ({err!r})") from None
            for asked_by, names in models:
                if any(same_model(name, self.expected) for name in names):
                    self.served[url] = asked_by
                    return asked_by
            shown = " or ".join(dict.fromkeys(name for _, names in models for name in names)) or "no model"
            which = "engine.served_model" if self.engine.served_model else "the configured model"
            raise KdError(
                f"{self.server_name} {url} serves {shown}, not {self.expected} ({which}); point engine.server at a "
                f"server of {self.expected}, or, if it serves that model under another name, set "
                f"engine.served_model: {next((n for _, names in models for n in names), '<its name>')}"
            )

    def _send(self, url: str, method: str, path: str, body: dict | None, expect_json: bool, timeout: float):
        """One try at one server: its answer; Unreachable for a failure another try may not meet."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
            return json.loads(payload) if expect_json else payload.decode(errors="replace")
        except urllib.error.HTTPError as err:
            detail = " ".join(err.read().decode(errors="replace").split())[:300]
            if err.code < 500 and re.search(self.lost, detail):
                raise Lost(f"HTTP {err.code}: {detail}") from None
            if err.code == 404:  # no such endpoint: another kind of server (or none) answers there
                raise Refused(f"{self.server_name} {url}{path}: HTTP 404, no such endpoint; is this a "
                              f"{self.server_name}? Check engine.kind and engine.server", url, detail) from None
            if err.code < 500:  # the request is wrong: retrying cannot help
                raise Refused(f"{self.server_name} {url}{path}: HTTP {err.code}: {detail}", url, detail) from None
            raise Unreachable(f"HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException) as err:
            raise Unreachable(str(getattr(err, "reason", err)) or type(err).__name__) from None
        except ValueError:
            raise KdError(f"{self.server_name} {url}{path}: the answer is not JSON; is this a {self.server_name}?") from None

    def _in_turn(self) -> list[str]:
        """Every server, from the next in turn on; those that failed in the last DOWN_SECONDS last."""
        start = next(self._turns) % len(self.urls)
        turn = self.urls[start:] + self.urls[:start]
        failed_at, now = dict(self._failed_at), time.monotonic()
        resting = {url for url in turn if now - failed_at.get(url, -DOWN_SECONDS) < DOWN_SECONDS}
        return [url for url in turn if url not in resting] + [url for url in turn if url in resting]

    def _warn(self, url: str, why: str) -> None:
        """Say once per server that it failed while another took its request."""
        with self._lock:
            if url in self._warned:
                return
            self._warned.add(url)
        print(f"kd: warning: {self.server_name} {url} failed ({why}); the other servers take its requests, and it "
              f"is tried again after {DOWN_SECONDS:.0f} s", file=sys.stderr)

    def _forget(self, url: str) -> None:
        """Drop what kd knows of server `url`: its checked model (subclasses: what kd loaded there)."""
        self.served.pop(url, None)

    def _try(self, url: str, send: Callable[[str], object]):
        """send(url) after the model check; what kd knew of the server is forgotten if it fails."""
        forgotten = self._forgotten[url]
        try:
            self._check_model(url)
            return send(url)
        except Unreachable:
            with self._url_locks[url]:
                if self._forgotten[url] == forgotten:
                    self._forgotten[url] += 1
                    self._forget(url)
            raise

    def _request(self, method: str, path: str, body: dict | Callable[[str], dict] | None = None,
                 tokens: int = 0) -> tuple[str, dict]:
        """The server that answered, and its answer. `body`: a dict, or a function of a server's URL
        giving the body for that server (one that names what that server has loaded); `tokens`: the ids
        sent plus the new tokens asked for, which lengthen each try's timeout by engine.seconds_per_token
        apiece."""
        timeout = self.engine.request_timeout + tokens * self.engine.seconds_per_token
        return self._at_a_server(
            path, lambda url: self._send(url, method, path, body(url) if callable(body) else body, True, timeout))

    def _at_a_server(self, path: str, send: Callable[[str], object]) -> tuple[str, object]:
        """send(url) at the servers in turn until one answers: that server and its answer. Every server
        is tried engine.max_retries + 1 times at most; `path` names the request in errors."""
        retries = self.engine.max_retries
        failures: dict[str, str] = {}
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(2 ** attempt * 0.5, 30))
            for url in self._in_turn():
                try:
                    try:
                        answer = self._try(url, send)
                    except Lost:  # restarted since kd's last request there: checked and loaded again, sent again
                        answer = self._try(url, send)
                except Unreachable as err:
                    failures[url] = str(err)
                    self._failed_at[url] = time.monotonic()
                    continue
                self._failed_at.pop(url, None)
                for failed, why in failures.items():
                    if failed != url:
                        self._warn(failed, why)
                return url, answer
        fix = f"check that {self.start_hint} runs there" + (
            " (or, if it is only slow, raise engine.seconds_per_token or engine.request_timeout)"
            if any("timed out" in why for why in failures.values()) else "") + ", then re-run the same command"
        if len(self.urls) == 1:
            raise KdError(f"{self.server_name} {self.urls[0]}{path}: unreachable after {retries + 1} tries "
                          f"({failures[self.urls[0]]}); {fix}")
        raise KdError(f"{self.server_name}s {', '.join(self.urls)} ({path}): every one unreachable after {retries + 1} "
                      f"tries each ({'; '.join(f'{url}: {why}' for url, why in failures.items())}); {fix}")

    def _post_each(self, path: str, items: list, body: Callable, parse: Callable, what: str,
                   progress: Callable[[int], None] | None = None, new_tokens: int = 0) -> list:
        """POST body(item, url) to `path` at one of the servers for every item, engine.concurrency at a
        time, and parse(item, answer) each answer, in order; an answer parse cannot read fails in one
        line naming `what` it was. `items`: tuples whose first element is the token ids sent, asking
        for `new_tokens` more (together they set the timeout)."""
        def one(item):
            url, answer = self._request("POST", path, lambda url: body(item, url), tokens=len(item[0]) + new_tokens)
            try:
                return parse(item, answer)
            except (KeyError, IndexError, TypeError, ValueError) as err:
                raise KdError(f"{self.server_name} {url}: malformed {what} ({err})") from None

        with ThreadPoolExecutor(self.engine.concurrency) as pool:
            results = []
            for result in pool.map(one, items):
                results.append(result)
                if progress is not None:
                    progress(1)
            return results
