"""A WSGI app (the gateway's Flask app) under granian's RSGI interface, slow clients kept out.

A thread-per-request server lends a thread to a request as soon as its headers are in, and the
app then reads the body from the socket on that thread: a client that sends its body slowly
holds the thread for as long as it likes, and a few hundred such clients hold them all (granian's
own WSGI interface works that way too). Here the body is received on the worker's event loop,
where a waiting request costs no thread, against a deadline and the size limit; only a request
that has arrived whole is handed to a thread of the pool, and the WSGI app reads its body from
memory. Slow headers never reach Python: granian closes a connection whose headers take longer
than its header timeout.

What this layer refuses, it answers in the app's own error format, ``{"error", "detail"}``:
413 for a body over the limit (declared by Content-Length, or counted as a chunked body
arrives), 408 for a body not received in time, 414 and 431 for a request target or headers
over the header limit, 400 for a Content-Length that is not a number.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Headers = list[tuple[str, str]]

#: How much of a body over the limit is read and dropped before the 413 (see _receive_body).
_DRAIN_LIMIT = 64 * 1024
#: Bytes a header line adds beyond its name and value (": " and CRLF).
_LINE_OVERHEAD = 4
#: Headers that become CONTENT_TYPE and CONTENT_LENGTH rather than HTTP_* (PEP 3333).
_UNPREFIXED = {"content-type": "CONTENT_TYPE", "content-length": "CONTENT_LENGTH"}


class Scope(Protocol):
    """What this module reads of an RSGI HTTP scope (granian's object)."""

    proto: str
    http_version: str
    server: str
    client: str
    scheme: str
    method: str
    path: str
    query_string: str

    @property
    def headers(self) -> Any: ...


class HTTPProtocol(Protocol):
    def __aiter__(self) -> Any: ...

    def response_bytes(self, status: int, headers: Headers, body: bytes) -> None: ...


@dataclass(frozen=True)
class Limits:
    max_body: int
    max_header: int
    body_timeout: float


class Refused(Exception):
    """A request answered by this layer instead of the app."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class BufferedWSGI:
    """An RSGI application that runs ``app`` on ``threads`` threads, each request whole.

    ``on_stop`` runs once the server has stopped taking requests and those in flight have
    been answered (granian calls ``__rsgi_del__`` then).
    """

    def __init__(
        self,
        app: WSGIApp,
        limits: Limits,
        *,
        threads: int,
        on_stop: Callable[[], None] = lambda: None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.threads = threads
        self.on_stop = on_stop
        self._pool: ThreadPoolExecutor | None = None

    def __rsgi_init__(self, _loop: asyncio.AbstractEventLoop) -> None:
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="gateway-request")

    def __rsgi_del__(self, _loop: asyncio.AbstractEventLoop) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.on_stop()

    async def __rsgi__(self, scope: Scope, proto: HTTPProtocol) -> None:
        if scope.proto != "http":  # websockets: nothing here speaks them
            return
        try:
            headers = list(scope.headers.items())
            self._check_head(scope, headers)
            body = await self._receive_body(proto, headers)
        except Refused as refused:
            # The rest of the request may still be on its way: do not keep the connection.
            proto.response_bytes(
                refused.status,
                [("content-type", "application/json"), ("connection", "close")],
                _compact({"error": refused.error, "detail": refused.detail}),
            )
            return
        environ = wsgi_environ(scope, headers, body)
        assert self._pool is not None, "granian calls __rsgi_init__ before any request"
        loop = asyncio.get_running_loop()
        status, response_headers, response_body = await loop.run_in_executor(
            self._pool, run_wsgi, self.app, environ
        )
        proto.response_bytes(status, response_headers, response_body)

    def _check_head(self, scope: Scope, headers: Headers) -> None:
        limit = self.limits.max_header
        target = len(scope.path) + len(scope.query_string) + 1
        if target > limit:
            raise Refused(414, "uri_too_long", f"the request target is over {limit} bytes")
        size = target + sum(len(name) + len(value) + _LINE_OVERHEAD for name, value in headers)
        if size > limit:
            raise Refused(
                431,
                "request_header_fields_too_large",
                f"the request line and headers are over {limit} bytes",
            )

    async def _receive_body(self, proto: HTTPProtocol, headers: Headers) -> bytes:
        limit = self.limits.max_body
        declared = next((value for name, value in headers if name == "content-length"), None)
        if declared is not None and not declared.strip().isdigit():
            raise Refused(400, "bad_request", "Content-Length is not a number")
        too_large = declared is not None and int(declared) > limit
        if too_large and int(declared or 0) > _DRAIN_LIMIT:
            raise _too_large(limit)
        chunks: list[bytes] = []
        received = 0
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                async for chunk in proto:
                    received += len(chunk)
                    too_large = too_large or received > limit
                    if too_large:
                        # Read on (and drop) what is on its way, up to a point: closing a
                        # socket with unread data resets it, and the client may then lose the
                        # 413 while it is still sending.
                        if received > _DRAIN_LIMIT:
                            break
                        continue
                    chunks.append(chunk)
        except TimeoutError:
            if too_large:
                raise _too_large(limit) from None
            raise Refused(
                408,
                "request_timeout",
                f"the request body did not arrive within {self.limits.body_timeout:g} s",
            ) from None
        if too_large:
            raise _too_large(limit)
        return b"".join(chunks)


def _compact(document: dict[str, str]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _too_large(limit: int) -> Refused:
    return Refused(413, "request_entity_too_large", f"the request body is over {limit} bytes")


def wsgi_environ(scope: Scope, headers: Headers, body: bytes) -> dict[str, Any]:
    """The PEP 3333 environ of a request whose body has been received whole."""
    server_host, _, server_port = scope.server.rpartition(":")
    client_host, _, client_port = scope.client.rpartition(":")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope.method,
        "SCRIPT_NAME": "",
        # granian hands over the path percent-decoded as UTF-8; WSGI wants its bytes as latin-1.
        "PATH_INFO": scope.path.encode("utf-8", "surrogateescape").decode("latin-1"),
        "QUERY_STRING": scope.query_string,
        "SERVER_NAME": server_host.strip("[]"),
        "SERVER_PORT": server_port,
        "SERVER_PROTOCOL": f"HTTP/{scope.http_version}",
        "REMOTE_ADDR": client_host.strip("[]"),
        "REMOTE_PORT": client_port,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.scheme,
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for name, value in headers:
        if name == "transfer-encoding":
            continue  # the body is already de-chunked; its length is below
        key = _UNPREFIXED.get(name) or "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    environ["CONTENT_LENGTH"] = str(len(body)) if body else environ.get("CONTENT_LENGTH", "")
    return environ


def run_wsgi(app: WSGIApp, environ: dict[str, Any]) -> tuple[int, Headers, bytes]:
    """Call a WSGI app; its status, headers and whole body."""
    started: list[Any] = []
    written: list[bytes] = []

    def start_response(status: str, headers: Headers, exc_info: Any = None) -> Callable:
        if exc_info is not None and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [status, headers]
        return written.append

    result = app(environ, start_response)
    try:
        written.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers = started
    return int(status.split(" ", 1)[0]), list(headers), b"".join(written)
