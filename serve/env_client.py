"""A Python client of the ``env.value`` service (``serve/env_app.py``).

    client = EnvValueClient("http://127.0.0.1:8001", api_key="...")
    ids = client.submit("nanogpt", ["use a cosine schedule with 10% warm-up"])
    for result in client.stream("nanogpt", ids): ...
    results = client.value("toy", [{"knobs": {"lr": 0.1}}], timeout_s=600)

Every call is bounded (``timeout_s``); errors come back as :class:`EnvValueError` carrying the
server's OpenAI-style message and status.
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterator, Sequence

import httpx

from envs.base import Idea, Result


class EnvValueError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class EnvValueClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 120.0):
        self.base = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s

    def _check(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text[:500]
            raise EnvValueError(r.status_code, msg)
        return r.json()

    def envs(self) -> list[str]:
        return [e["id"] for e in self._check(httpx.get(f"{self.base}/v1/envs", headers=self.headers,
                                                       timeout=self.timeout_s))["data"]]

    def describe(self, env: str) -> dict[str, Any]:
        return self._check(httpx.get(f"{self.base}/v1/envs/{env}", headers=self.headers, timeout=self.timeout_s))

    def submit(self, env: str, ideas: Sequence[str | dict | Idea], seed: int | None = None) -> list[str]:
        body: dict[str, Any] = {"ideas": [i.to_dict() if isinstance(i, Idea) else i for i in ideas]}
        if seed is not None:
            body["seed"] = seed
        r = httpx.post(f"{self.base}/v1/envs/{env}/ideas", json=body, headers=self.headers, timeout=self.timeout_s)
        return self._check(r)["ids"]

    def results(self, env: str, ids: Sequence[str], wait_s: float = 0.0) -> tuple[list[Result], list[dict]]:
        r = httpx.get(f"{self.base}/v1/envs/{env}/results", params={"ids": ",".join(ids), "wait_s": wait_s},
                      headers=self.headers, timeout=self.timeout_s + wait_s)
        data = self._check(r)
        return [Result.from_dict(d) for d in data["results"]], data["pending"]

    def stream(self, env: str, ids: Sequence[str], timeout_s: float = 600.0) -> Iterator[Result]:
        """Results in completion order (server-sent events); ids still pending when the
        server's window closes are not yielded."""
        with httpx.stream("GET", f"{self.base}/v1/envs/{env}/stream",
                          params={"ids": ",".join(ids), "timeout_s": timeout_s}, headers=self.headers,
                          timeout=httpx.Timeout(self.timeout_s, read=timeout_s + 30)) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    return
                d = json.loads(payload)
                if d.get("status") != "pending":
                    yield Result.from_dict(d)

    def value(self, env: str, ideas: Sequence[str | dict | Idea], timeout_s: float = 3600.0,
              seed: int | None = None) -> list[Result]:
        """Submit and wait (long-polls, bounded by ``timeout_s``); results in submission order.
        Ideas still running at the deadline come back as ``infra_failed`` with stage ``timeout``."""
        ids = self.submit(env, ideas, seed=seed)
        got: dict[str, Result] = {}
        end = time.monotonic() + timeout_s
        while len(got) < len(ids) and time.monotonic() < end:
            left = [i for i in ids if i not in got]
            done, _ = self.results(env, left, wait_s=min(30.0, max(0.0, end - time.monotonic())))
            got.update({r.idea_id: r for r in done})
        return [got.get(i) or Result(idea_id=i, status="infra_failed", stage="timeout", env=env,
                                     error=f"no result within {timeout_s}s") for i in ids]
