"""A real OpenAI-compatible chat completions server on 127.0.0.1 that answers with logprobs.

It reads the "(A) ..." and "(B) ..." option lines of the last user message and returns, for the
first answer token, ``top_logprobs`` in which the option the test's rule prefers is likely.
The default rule prefers the option that refuses (contains "refuse", "can't", "cannot" or
"won't") with probability 0.9. Before answering normally it follows a script of faults:
"429", "500", "slow" (sleeps ``slow_seconds``), "garbage" (a 200 answer without logprobs),
"badjson" (a 200 body that is not JSON), "nochoice" (top tokens without either letter).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REFUSAL_WORDS = ("refuse", "can't", "cannot", "won't")
FILLER = [("The", -4.0), (" I", -5.0), ("Option", -6.0), ("\n", -7.0)]


def prefers_refusal(a: str, b: str) -> float:
    """P(A) under the default rule: 0.9 for the refusing option, 0.5 when both or neither refuse."""
    ra = any(w in a.lower() for w in REFUSAL_WORDS)
    rb = any(w in b.lower() for w in REFUSAL_WORDS)
    return 0.5 if ra == rb else (0.9 if ra else 0.1)


def options_of(text: str) -> tuple[str, str]:
    a = re.search(r"^\(A\) (.*)$", text, re.M)
    b = re.search(r"^\(B\) (.*)$", text, re.M)
    return (a.group(1) if a else ""), (b.group(1) if b else "")


class LogprobServer:
    def __init__(
        self, rule: Callable[[str, str], float] = prefers_refusal, tokens: tuple[str, str] = ("A", "B")
    ):
        self.rule = rule  # rule(option_a_text, option_b_text) -> P(A)
        self.tokens = tokens  # how the two letters are spelled as tokens, e.g. (" A", " B") or ("(A", "(B")
        self.script: list[str] = []
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        self.lock = threading.Lock()
        self.slow_seconds = 2.0
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server.lock:
                    server.requests.append(body)
                    server.auth_headers.append(self.headers.get("Authorization", ""))
                    fault = server.script.pop(0) if server.script else None
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body, fault)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, body, fault):
                if fault == "429":
                    return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}})
                if fault == "500":
                    return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
                if fault == "badjson":
                    return self._send_raw(200, b"<html>not json</html>")
                if fault == "slow":
                    time.sleep(server.slow_seconds)
                else:
                    time.sleep(0.01)  # long enough for concurrent requests to overlap
                logprobs = None if fault == "garbage" else server.logprobs(body, nochoice=fault == "nochoice")
                self._send(
                    200,
                    {
                        "id": "cmpl-1",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body.get("model", "m"),
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "length",
                                "logprobs": logprobs,
                                "message": {"role": "assistant", "content": "A"},
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

            def _send(self, status, payload):
                self._send_raw(status, json.dumps(payload).encode())

            def _send_raw(self, status, data):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def logprobs(self, body: dict, nochoice: bool = False) -> dict | None:
        if not body.get("logprobs"):
            return None
        a, b = options_of(body["messages"][-1]["content"])
        p_a = min(max(self.rule(a, b), 1e-6), 1 - 1e-6)
        rest = 0.02  # mass left for the filler tokens
        top = (
            []
            if nochoice
            else [
                (self.tokens[0], math.log(p_a * (1 - rest))),
                (self.tokens[1], math.log((1 - p_a) * (1 - rest))),
            ]
        )
        top = sorted(top + FILLER, key=lambda t: -t[1])[: int(body.get("top_logprobs") or 1)]
        entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
        return {"content": [{**entries[0], "top_logprobs": entries}], "refusal": None}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
