"""Local HTTP stand-ins for the services the daemons talk to (Supabase Storage, the job-callback).

Each stub is a real HTTP server on 127.0.0.1 in a daemon thread, usable as a context manager.
`LocalServer` below is their shared plumbing; the stubs live in `storage.py` and `callback_receiver.py`.
"""
from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HTML_OUTAGE = ("<html><head><title>{status} Service Unavailable</title></head><body><center>"
               "<h1>{status} Service Temporarily Unavailable</h1></center><hr><center>nginx</center></body></html>")


@dataclass
class Request:
    method: str
    path: str  # without the query, still percent-encoded
    query: dict[str, str]
    headers: Message
    body: bytes


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] | None = None
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes


def json_reply(status: int, obj) -> Reply:
    return Reply(status, json.dumps(obj).encode())


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        reply = self.server.owner._dispatch(Request(self.command, parts.path, query, self.headers, body))
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for name, value in (reply.headers or {}).items():
            self.send_header(name, value)
        if reply.send_length:
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _serve

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "LocalServer"


class LocalServer:
    """A threaded HTTP server on 127.0.0.1; subclasses implement `handle(request) -> Reply`.

    `stop()` then `start()` brings it back on the same port, to simulate an outage. With `tls` (a
    server-side SSLContext) it speaks HTTPS. `statuses` holds the HTTP status of every request and
`requests` its (method, path, headers).
    """

    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None):
        self.port = port
        self.tls = tls
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified whenever a request was answered
        self.statuses: list[int] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._failures: list[int] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def handle(self, request: Request) -> Reply:
        raise NotImplementedError

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next `n` requests with an HTML error page (a proxy in front of a sick service)."""
        with self.lock:
            self._failures.extend([status] * n)

    def heal(self) -> None:
        """Drop the failures still planned by fail_next: the service is healthy again."""
        with self.lock:
            self._failures.clear()

    def _dispatch(self, request: Request) -> Reply:
        with self.lock:
            status = self._failures.pop(0) if self._failures else None
        if status is not None:
            reply = Reply(status, HTML_OUTAGE.format(status=status).encode(), "text/html")
        else:
            reply = self.handle(request)
        with self.changed:
            self.statuses.append(reply.status)
            self.requests.append((request.method, request.path, dict(request.headers.items())))
            self.changed.notify_all()
        return reply

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[int]:
        """Statuses of the first `n` requests (any outcome), waiting up to `timeout` seconds for them."""
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.statuses) >= n, timeout):
                raise TimeoutError(f"only {len(self.statuses)} of {n} requests within {timeout} s")
            return self.statuses[:n]

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> "LocalServer":
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.owner = self
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
