"""What stands in front of the server's handlers, and how `lfm2 serve` starts: the API key, the
body size limit, and the command line's errors and help.

The key and the limit are tested on a live server (uvicorn on 127.0.0.1) with the official
`openai` client, and with hand-made HTTP where a client library would hide the point: a body
announced but never sent, a body sent in chunks.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket

import httpx
import openai
import pytest

import lfm2
from lfm2 import cli, server
from tests.test_server import MODEL, Live

KEY = "lfm2-test-key-0123456789"
LIMIT = 4096


@pytest.fixture(scope="module")
def llm(chat_checkpoint):
    return lfm2.load(chat_checkpoint)


@pytest.fixture(scope="module")
def guarded(llm):
    live = Live(llm, max_batch=2, max_queue=2, max_len=64, api_key=KEY, max_body_bytes=LIMIT)
    yield live
    live.close()


def client(live: Live, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0, timeout=60)


def is_error(r: httpx.Response, status: int, code: str) -> bool:
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return r.status_code == status and error["code"] == code and error["type"] == "invalid_request_error"


# -- API key ---------------------------------------------------------------------------------------


def test_the_api_key_opens_every_route_but_health_and_the_docs(guarded):
    right = client(guarded, KEY)
    assert [m.id for m in right.models.list().data] == [MODEL]
    reply = right.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError) as e:
        client(guarded, KEY + "x").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(guarded, KEY[:-1]).models.list()

    url = guarded.url
    for headers in ({}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}, {"Authorization": "Bearer"}):
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi"}, headers=headers)
        assert is_error(r, 401, "invalid_api_key") and r.headers["WWW-Authenticate"] == "Bearer"
    assert "didn't provide an API key" in httpx.get(url + "/v1/models").json()["error"]["message"]
    assert httpx.get(url + "/nowhere").status_code == 401  # routes are not given away either
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert httpx.get(url + "/health").json()["status"] == "ok"
    doc = httpx.get(url + "/openapi.json").json()
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, item in doc["paths"].items():
        for operation in item.values():
            assert ("401" in operation["responses"]) == (path != "/health")
            assert ("security" in operation) == (path != "/health")


def test_an_open_address_without_a_key_is_warned_about():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert server._exposed(host, None) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "myhost.example"):
        assert "without an API key" in server._exposed(host, None)
        assert server._exposed(host, "k") is None


def test_the_key_comes_from_the_flag_else_the_environment(monkeypatch):
    seen = []
    monkeypatch.setattr(server, "serve", lambda *a, **kw: seen.append(kw["api_key"]))
    parser = argparse.ArgumentParser()
    server.add_serve_parser(parser.add_subparsers())
    monkeypatch.delenv("LFM2_API_KEY", raising=False)
    server.cmd_serve(parser.parse_args(["serve"]))
    monkeypatch.setenv("LFM2_API_KEY", "from-env")
    server.cmd_serve(parser.parse_args(["serve"]))
    server.cmd_serve(parser.parse_args(["serve", "--api-key", "from-flag"]))
    monkeypatch.setenv("LFM2_API_KEY", "")
    server.cmd_serve(parser.parse_args(["serve"]))
    assert seen == [None, "from-env", "from-flag", None]


# -- body size -------------------------------------------------------------------------------------


def raw(live: Live, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send a hand-made request (headers, then `body` as given); the reply's status and JSON."""
    port = int(live.url.rsplit(":", 1)[1])
    request = (f"{head}\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
               "Connection: close\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_a_body_over_the_limit_is_refused_unread(guarded):
    # Announced but never sent: the answer comes from Content-Length alone.
    status, body = raw(guarded, "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1000000000")
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert "1000000000 bytes" in body["error"]["message"] and str(LIMIT) in body["error"]["message"]
    # Sent in chunks, no length announced: refused once the bytes received pass the limit.
    half = b"x" * (LIMIT // 2 + 1)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(half), half) for _ in range(2)) + b"0\r\n\r\n"
    status, body = raw(guarded, "POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked", chunks)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # At the limit, whole or chunked, the body goes through.
    request = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 1}).encode()
    request += b" " * (LIMIT - len(request))
    status, body = raw(guarded, f"POST /v1/completions HTTP/1.1\r\nContent-Length: {LIMIT}", request)
    assert status == 200 and body["usage"]["completion_tokens"] == 1
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (request[:100], request[100:])) + b"0\r\n\r\n"
    status, body = raw(guarded, "POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked", chunked)
    assert status == 200 and body["usage"]["completion_tokens"] == 1
    with pytest.raises(openai.APIStatusError) as e:
        client(guarded, KEY).completions.create(model=MODEL, prompt="x" * LIMIT)
    assert e.value.status_code == 413 and e.value.code == "request_too_large"


# -- command line ----------------------------------------------------------------------------------


def fails_with(capsys, argv: list[str]) -> str:
    """`lfm2 ARGV` must exit 2 with one line on stderr, `lfm2: error: ...`; that line."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("lfm2: error: ") and err.count("\n") == 1, err
    return err


def test_bad_ports_and_a_port_in_use_are_one_line_errors(capsys):
    for port in ("99999", "-1", "http"):
        assert "not a TCP port" in fails_with(capsys, ["serve", "--port", port])
    assert "positive" in fails_with(capsys, ["serve", "--max-body-bytes", "0"])
    assert "empty" in fails_with(capsys, ["serve", "--api-key", " "])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = fails_with(capsys, ["serve", "--host", "127.0.0.1", "--port", str(port)])  # before the model loads
    assert f"127.0.0.1:{port}" in err and "in use" in err


def test_serve_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for default in ("(default: 127.0.0.1)", "(default: 8000)", f"(default: {server.DEFAULT_MAX_BODY_BYTES}, 4 MiB)",
                    "(default: $LFM2_API_KEY, else none)", "(default: 16)", "(default: 64)", "(default: info)",
                    "(default: cpu)", "(default: the bundled tiny model)"):
        assert default in text, default
