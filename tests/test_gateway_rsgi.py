"""gateway/rsgi.py's translation between a request received whole and a WSGI app, without a
server: the environ a request becomes, and what a WSGI app's answer becomes. (The server itself,
slow and oversized clients included, is tests/test_gateway_slow_clients.py.)"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import pytest
from flask import Flask, jsonify, request

from gateway.rsgi import run_wsgi, wsgi_environ


@dataclass
class Headers:
    pairs: list[tuple[str, str]]

    def items(self) -> list[tuple[str, str]]:
        return self.pairs


@dataclass
class Scope:
    method: str = "POST"
    path: str = "/charge"
    query_string: str = ""
    server: str = "127.0.0.1:8000"
    client: str = "127.0.0.1:54321"
    scheme: str = "http"
    http_version: str = "1.1"
    proto: str = "http"
    header_pairs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def headers(self) -> Headers:
        return Headers(self.header_pairs)


def environ_of(scope: Scope, body: bytes = b"") -> dict:
    return wsgi_environ(scope, scope.header_pairs, body)


def test_the_environ_has_what_pep_3333_asks_for():
    scope = Scope(
        query_string="a=1&b=%20",
        header_pairs=[("content-type", "application/json"), ("content-length", "2")],
    )
    environ = environ_of(scope, b"{}")
    assert environ["REQUEST_METHOD"] == "POST"
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("", "/charge")
    assert environ["QUERY_STRING"] == "a=1&b=%20"
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("127.0.0.1", "8000")
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("127.0.0.1", "54321")
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert (environ["CONTENT_TYPE"], environ["CONTENT_LENGTH"]) == ("application/json", "2")
    assert "HTTP_CONTENT_TYPE" not in environ and "HTTP_CONTENT_LENGTH" not in environ
    assert environ["wsgi.input"].read() == b"{}"
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["wsgi.errors"] is sys.stderr


def test_ipv6_addresses_lose_their_brackets():
    environ = environ_of(Scope(server="[::1]:8000", client="[::1]:40000"))
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("::1", "8000")
    assert environ["REMOTE_ADDR"] == "::1"


def test_repeated_headers_are_joined_with_commas():
    environ = environ_of(Scope(header_pairs=[("x-forwarded-for", "a"), ("x-forwarded-for", "b")]))
    assert environ["HTTP_X_FORWARDED_FOR"] == "a,b"


def test_a_chunked_body_reaches_the_app_with_its_length_and_without_the_chunking():
    environ = environ_of(Scope(header_pairs=[("transfer-encoding", "chunked")]), b"12345")
    assert environ["CONTENT_LENGTH"] == "5"
    assert "HTTP_TRANSFER_ENCODING" not in environ


def test_a_request_without_a_body_has_an_empty_content_length():
    environ = environ_of(Scope(method="GET", path="/health"))
    assert environ["CONTENT_LENGTH"] == ""
    assert environ["wsgi.input"].read() == b""


@pytest.fixture
def echo() -> Flask:
    app = Flask("echo")

    @app.route("/<path:anything>", methods=["GET", "POST"])
    def answer(anything: str):
        return jsonify(
            path=request.path,
            args=request.args.to_dict(),
            body=request.get_data(as_text=True),
            agent=request.headers.get("User-Agent"),
        ), 201

    return app


def test_flask_sees_the_decoded_path_the_query_the_body_and_the_headers(echo: Flask):
    # granian hands over the path percent-decoded, as text: "/caf%C3%A9" arrives as "/café".
    scope = Scope(
        path="/café",
        query_string="q=%C3%A9",
        header_pairs=[("user-agent", "test"), ("content-type", "text/plain")],
    )
    status, headers, body = run_wsgi(echo, environ_of(scope, b"hello"))
    assert status == 201
    assert ("Content-Type", "application/json") in headers
    assert echo.json.loads(body) == {
        "path": "/café",
        "args": {"q": "é"},
        "body": "hello",
        "agent": "test",
    }


def test_the_app_s_iterable_is_closed_and_its_chunks_joined():
    closed = []

    class Answer:
        def __iter__(self):
            yield b"one, "
            yield b"two"

        def close(self) -> None:
            closed.append(True)

    def app(environ, start_response):
        start_response("418 I'm a teapot", [("X-Kind", "teapot")])
        return Answer()

    assert run_wsgi(app, environ_of(Scope())) == (418, [("X-Kind", "teapot")], b"one, two")
    assert closed == [True]


def test_an_error_after_the_answer_started_is_raised_not_hidden():
    def app(environ, start_response):
        start_response("200 OK", [])
        try:
            raise ValueError("late")
        except ValueError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b""]

    with pytest.raises(ValueError, match="late"):
        run_wsgi(app, environ_of(Scope()))
