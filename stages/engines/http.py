"""What the server engines share: JSON over HTTP with retries, timeouts and bounded concurrency.

A request that the server refuses (HTTP 4xx) fails at once with the server's reason; a server that
is down, overloaded (5xx) or slow is retried with exponential backoff (engine.max_retries, each try
bounded by engine.request_timeout), then fails with one line naming the server and the fix.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from kd.stages.config import EngineConfig
from kd.stages.errors import KdError


class ServerClient:
    """`server_name` (e.g. "vLLM server") and `start_hint` (how to start one) word its errors."""

    server_name = "server"
    start_hint = "start it"

    def __init__(self, engine: EngineConfig):
        self.url = engine.server.rstrip("/")
        self.engine = engine

    def _request(self, method: str, path: str, body: dict | None = None, expect_json: bool = True,
                 retries: int | None = None):
        """`retries`: tries after the first (default engine.max_retries)."""
        data = None if body is None else json.dumps(body).encode()
        last_error = ""
        retries = self.engine.max_retries if retries is None else retries
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(2 ** attempt * 0.5, 30))
            request = urllib.request.Request(
                self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.engine.request_timeout) as response:
                    payload = response.read()
                return json.loads(payload) if expect_json else payload.decode(errors="replace")
            except urllib.error.HTTPError as err:
                detail = " ".join(err.read().decode(errors="replace").split())[:300]
                if err.code == 404:  # no such endpoint: another kind of server (or none) answers there
                    raise KdError(f"{self.server_name} {self.url}{path}: HTTP 404, no such endpoint; is this a "
                                  f"{self.server_name}? Check engine.kind and engine.server") from None
                if err.code < 500:  # the request is wrong: retrying cannot help
                    raise KdError(f"{self.server_name} {self.url}{path}: HTTP {err.code}: {detail}") from None
                last_error = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException) as err:
                last_error = str(getattr(err, "reason", err)) or type(err).__name__
            except ValueError:
                raise KdError(f"{self.server_name} {self.url}{path}: the answer is not JSON; "
                              f"is this a {self.server_name}?") from None
        raise KdError(
            f"{self.server_name} {self.url}{path}: unreachable after {retries + 1} tries ({last_error}); "
            f"check that {self.start_hint} runs there, then re-run the same command"
        )

    def _get(self, path: str) -> dict:
        return self._request("GET", path)

    def _post(self, path: str, body: dict) -> dict:
        return self._request("POST", path, body)

    def _post_each(self, path: str, items: list, body: Callable, parse: Callable, what: str,
                   progress: Callable[[int], None] | None = None) -> list:
        """POST body(item) to `path` for every item, engine.concurrency at a time, and parse(item, answer)
        each answer, in order; an answer parse cannot read fails in one line naming `what` it was."""
        def one(item):
            answer = self._post(path, body(item))
            try:
                return parse(item, answer)
            except (KeyError, IndexError, TypeError, ValueError) as err:
                raise KdError(f"{self.server_name} {self.url}: malformed {what} ({err})") from None

        with ThreadPoolExecutor(self.engine.concurrency) as pool:
            results = []
            for result in pool.map(one, items):
                results.append(result)
                if progress is not None:
                    progress(1)
            return results
