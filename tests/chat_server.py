"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests (chat completions only).

Answers follow a script of faults ("429", "500", "garbage", "slow") before answering normally;
a normal answer is JSON naming the principle whose keyword appears in the request.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    def __init__(self, keywords: dict[str, str] | None = None):
        self.keywords = keywords or {}
        self.script: list[str] = []
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        self.lock = threading.Lock()
        self.slow_seconds = 2.0
        self.models = ["gpt-4o-mini"]  # what GET /v1/models lists
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):  # /v1/models, for the start-up check: serves whatever model is asked for
                server.auth_headers.append(self.headers.get("Authorization", ""))
                self._send(
                    200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.models]}
                )

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server.lock:
                    server.requests.append(body)
                    server.auth_headers.append(self.headers.get("Authorization", ""))
                    fault = server.script.pop(0) if server.script else None
                if fault == "429":
                    return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}})
                if fault == "500":
                    return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
                if fault == "slow":
                    time.sleep(server.slow_seconds)
                content = "this is not json" if fault == "garbage" else json.dumps(server.answer(body))
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
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": content},
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, body: dict) -> dict:
        text = body["messages"][-1]["content"]
        request = text.split("Request:", 1)[-1].lower()
        for word, label in self.keywords.items():
            if word in request:
                return {"principle": label, "confidence": 0.9}
        return {"principle": "other", "confidence": 0.6}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
