"""A real HTTP server on 127.0.0.1, in a thread, that misbehaves on request: for unit tests of
pure client logic that need real sockets (timeouts, dropped connections), which httpx's
MockTransport cannot give. It stands in for no part of vLLM: the e2e tests use the real server."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODELS = {
    "object": "list",
    "data": [{"id": "endpoint-extractor", "object": "model", "created": 0, "owned_by": "me"}],
}


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes
    headers: dict[str, str] = field(default_factory=dict)


HANG = "hang"  # never answer (until the server stops)
CLOSE = "close"  # close the connection without an answer
# behave(path, parsed JSON body or None) -> a Reply, HANG or CLOSE
Behaviour = Callable[[str, Any], "Reply | str"]


class LocalServer:
    def __init__(self, behave: Behaviour) -> None:
        self.behave = behave
        self.requests: list[tuple[str, Any]] = []
        self.stopping = threading.Event()
        self._count = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                with outer._lock:
                    outer.requests.append((self.path, body))
                    outer._count += 1
                    number = outer._count
                reply = outer.behave(self.path, body)
                if reply == HANG:
                    outer.stopping.wait(60)
                    self.close_connection = True
                    return
                if reply == CLOSE or not isinstance(reply, Reply):
                    self.close_connection = True
                    return
                data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                headers = {
                    "content-type": "application/json",
                    "x-request-id": f"req-{number}",
                    **reply.headers,
                }
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._http.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def chat_texts(self) -> list[str]:
        """The endpoint text of each extraction request received (the user message's content)."""
        return [
            body["messages"][-1]["content"]
            for path, body in list(self.requests)
            if path.endswith("/chat/completions") and isinstance(body, dict)
        ]

    @contextmanager
    def running(self) -> Iterator[LocalServer]:
        self._thread.start()
        try:
            yield self
        finally:
            self.stopping.set()
            self._http.shutdown()
            self._http.server_close()


@contextmanager
def local_server(behave: Behaviour) -> Iterator[LocalServer]:
    with LocalServer(behave).running() as server:
        yield server
