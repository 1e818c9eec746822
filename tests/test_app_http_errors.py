"""The page's server under malformed requests (issue 12.10): bad ``Content-Length`` values, short
bodies, deeply nested JSON and idle connections get a clear 4xx (never a 500) and never hold a
handler thread for ever."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tangentscope.app import make_server
from test_app_server import SMALL, new_session, request

TIMEOUT = 0.5  # the server's request timeout in these tests (s)


@pytest.fixture
def server():
    srv = make_server(port=0, max_sessions=2, reap_after=30, heartbeat=0.2,
                      request_timeout=TIMEOUT).start()
    yield srv
    srv.shutdown()


def raw_request(srv, head: bytes, body: bytes = b"", *, wait: float = 5.0) -> tuple[int, dict]:
    """Send ``head`` (request line + headers, without the blank line) and ``body`` on a raw
    socket that stays open; return the status and the JSON error the server answers with."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=wait) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        data = b""
        t0 = time.monotonic()
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
        assert time.monotonic() - t0 < wait
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1] or b"{}")


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def _post(sid: str, extra: bytes) -> bytes:
    return (f"POST /api/sessions/{sid}/config HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\n").encode() + extra


@pytest.mark.parametrize("length,status,words", [
    (b"-1", 400, "non-negative integer"),
    (b"abc", 400, "non-negative integer"),
    (b"1e3", 400, "non-negative integer"),
    (b"\xd9\xa3", 400, "non-negative integer"),          # a non-ASCII digit
    (b"9" * 5000, 413, "over"),
    (b"99999999999", 413, "over"),
])
def test_bad_content_length_is_a_client_error(server, length, status, words):
    sid = new_session(server)
    got, err = raw_request(server, _post(sid, b"Content-Length: " + length))
    assert got == status and words in err["error"], err
    assert server.sessions.get(sid).alive


def test_a_short_body_is_a_400_after_the_request_timeout_not_a_hung_thread(server):
    sid = new_session(server)
    t0 = time.monotonic()
    got, err = raw_request(server, _post(sid, b"Content-Length: 100"), b'{"noise"')
    assert got == 400 and "Content-Length" in err["error"]
    assert time.monotonic() - t0 < TIMEOUT + 3


def test_deep_or_non_object_json_is_a_400(server):
    sid = new_session(server)
    for body, words in ((b"[" * 5000 + b"]" * 5000, "nests JSON too deeply"),
                        (b'{"noise": ' + b"[" * 5000 + b"]" * 5000 + b"}", "too deeply"),
                        (b"[1, 2]", "must be a JSON object"), (b"0.5", "must be a JSON object"),
                        (b"0", "must be a JSON object")):
        status, err, _ = request(server, "POST", f"/api/sessions/{sid}/config", raw=body)
        assert status == 400 and words in err["error"], (body[:20], err)
    status, err, _ = request(server, "POST", "/api/sessions", raw=b"[" * 5000 + b"]" * 5000)
    assert status == 400 and "too deeply" in err["error"]
    status, err, _ = request(server, "POST", "/api/sessions", raw=b"false")
    assert status == 400 and "must be a JSON object" in err["error"]


def test_idle_connections_are_closed_and_free_their_threads(server):
    before = threading.active_count()
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT + 4)
             for _ in range(20)]
    try:
        for s in socks:       # each is closed by the server (a hang would time out here)
            assert s.recv(1024) == b""
        deadline = time.monotonic() + 5
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before
    finally:
        for s in socks:
            s.close()
    status, body, _ = request(server, "GET", "/api/limits")    # and it still serves
    assert status == 200 and "limits" in body


def test_a_session_config_still_applies_after_the_errors(server):
    sid = new_session(server)
    raw_request(server, _post(sid, b"Content-Length: -1"))
    status, body, _ = request(server, "POST", f"/api/sessions/{sid}/config",
                              {"noise": SMALL.get("noise", 0.3) + 0.1})
    assert status == 200 and body["applied"] == "reset"
