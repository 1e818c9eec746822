"""The live page's server without a browser: event stream, controls, sessions, threads."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from tangentscope.app import make_server
from tangentscope.app.model import DemoConfig
from tangentscope.app.session import Session
from test_demo import _one_torch_thread  # noqa: F401 - autouse: one torch thread, as `app` runs

SMALL = {"n": 16, "width": 32, "depth": 2, "steps_per_update": 5, "max_steps": 100000}
STATUSES = {"starting", "ready", "running", "paused", "done", "diverged", "error"}


@pytest.fixture
def server():
    srv = make_server(port=0, max_sessions=2, reap_after=0.6, heartbeat=0.2).start()
    yield srv
    srv.shutdown()


def request(srv, method, path, body=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, (json.loads(payload) if "json" in ctype else payload), ctype


def new_session(srv, **cfg):
    status, body, _ = request(srv, "POST", "/api/sessions", {**SMALL, **cfg})
    assert status == 201, body
    return body["session"]


class EventStream:
    """A minimal server-sent-events client (``state`` frames as dicts)."""

    def __init__(self, srv, sid):
        self.conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        self.conn.request("GET", f"/api/sessions/{sid}/events")
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        assert self.resp.getheader("Content-Type") == "text/event-stream"

    def frames(self, count, timeout=30.0, where=lambda f: True):
        out, event, deadline = [], {}, time.monotonic() + timeout
        while len(out) < count:
            assert time.monotonic() < deadline, f"only {len(out)} frames in {timeout} s"
            line = self.resp.fp.readline().decode()
            assert line, "the stream closed"
            line = line.rstrip("\n")
            if line == "":
                if event.get("event") == "state":
                    frame = json.loads(event["data"])
                    frame["_id"] = int(event["id"])
                    if where(frame):
                        out.append(frame)
                event = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                event[key] = value
        return out

    def close(self):
        self.resp.close()  # the response holds the socket open too
        self.conn.close()


def session_threads():
    return [t for t in threading.enumerate() if t.name.startswith("tangentscope-session-")]


def test_page_and_assets_are_served_locally(server):
    status, _html, ctype = request(server, "GET", "/")
    assert status == 200 and ctype.startswith("text/html")
    for name, kind in (("app.js", "javascript"), ("style.css", "css")):
        status, body, ctype = request(server, "GET", f"/static/{name}")
        assert status == 200 and kind in ctype and len(body) > 500
    static = Path(__file__).parents[1] / "src/tangentscope/app/static"
    for f in static.iterdir():  # no CDN, no external fonts or scripts
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", f.read_text()), f
        assert "@import" not in f.read_text() and "url(http" not in f.read_text()
    assert request(server, "GET", "/static/../server.py")[0] == 404
    status, body, _ = request(server, "GET", "/api/limits")
    assert status == 200 and body["limits"]["width"] == {
        "type": "int", "min": 1, "max": 2048, "min_exclusive": False, "help": "hidden width"}
    assert "adamw" in body["optimizers"] and "sgd" in body["optimizers"]


def test_event_stream_delivers_well_formed_updates(server):
    sid = new_session(server)
    stream = EventStream(server, sid)
    assert request(server, "POST", f"/api/sessions/{sid}/start")[0] == 200
    frames = stream.frames(6, where=lambda f: f["status"] == "running" and f["step"] > 0)
    stream.close()
    n = SMALL["n"]
    steps = [f["step"] for f in frames]
    assert steps == sorted(steps) and steps[-1] > steps[0]
    for f in frames:
        assert f["session"] == sid and f["status"] in STATUSES
        lam, en = f["eigenvalues"], f["energies"]
        assert len(lam) == len(en) == n and len(f["fit"]) == f["config"]["n_test"]
        assert all(a >= b for a, b in zip(lam, lam[1:]))
        assert all(e >= 0 for e in en)
        # Parseval: Σ_i |⟨v_i, r⟩|² = ‖r‖² = 2 n Φ (6 significant digits on the wire)
        assert sum(en) == pytest.approx(2 * n * f["train_loss"], rel=1e-4)
        assert f["t_eff"] > 0 and f["threshold"] == pytest.approx(n / f["t_eff"], rel=1e-4)
        assert 0.0 <= f["reservoir_fraction"] <= 1.0
        assert len(f["data"]["x"]) == n and len(f["history"]["step"]) >= 1
        assert f["gd_lr_max"] == pytest.approx(2 * n / lam[0], rel=1e-4)


BAD = [
    ({"noise": -0.5}, "noise"), ({"width": 0}, "width"), ({"lr": 1e6}, "lr"),
    ({"lr": 0}, "lr"), ({"n": "abc"}, "n"), ({"depth": 99}, "depth"), ({"seed": 1.5}, "seed"),
    ({"width": True}, "width"), ({"noise": "NaN"}, "noise"), ({"optimizer": "adam"}, "optimizer"),
    ({"bogus": 1}, "bogus"), ([1, 2], ""),
]


def test_bad_controls_get_a_clear_400_and_leave_the_session_running(server):
    sid = new_session(server)
    stream = EventStream(server, sid)
    request(server, "POST", f"/api/sessions/{sid}/start")
    first = stream.frames(1, where=lambda f: f["status"] == "running")[0]
    before = request(server, "GET", f"/api/sessions/{sid}")[1]
    for body, field in BAD:
        status, err, _ = request(server, "POST", f"/api/sessions/{sid}/config", body)
        assert status == 400, body
        assert err["field"] == field and field in err["error"] and "allowed" in err
    status, err, _ = request(server, "POST", f"/api/sessions/{sid}/config", raw=b"{not json")
    assert status == 400 and "not valid JSON" in err["error"]
    status, err, _ = request(server, "POST", f"/api/sessions/{sid}/jump")
    assert status == 404 and "unknown action" in err["error"]
    later = stream.frames(3, where=lambda f: f["status"] == "running")
    stream.close()
    assert later[-1]["run"] == first["run"]  # never reset
    assert later[-1]["step"] > first["step"]  # still training
    after = request(server, "GET", f"/api/sessions/{sid}")[1]
    assert after["config"] == before["config"] and after["status"] == "running"


def test_valid_controls_apply_live_or_restart(server):
    sid = new_session(server)
    stream = EventStream(server, sid)
    request(server, "POST", f"/api/sessions/{sid}/start")
    first = stream.frames(2, where=lambda f: f["status"] == "running" and f["step"] > 0)[-1]
    status, body, _ = request(server, "POST", f"/api/sessions/{sid}/config", {"lr": 0.01})
    assert status == 200 and body["applied"] == "live" and body["config"]["lr"] == 0.01
    live = stream.frames(1, where=lambda f: f["config"]["lr"] == 0.01 and f["step"] > 0)[0]
    assert live["run"] == first["run"] and live["step"] >= first["step"]
    status, body, _ = request(server, "POST", f"/api/sessions/{sid}/config",
                              {"noise": 0.6, "n": 20})
    assert status == 200 and body["applied"] == "reset"
    new = stream.frames(1, where=lambda f: f["run"] > first["run"] and "eigenvalues" in f)[0]
    assert new["config"]["noise"] == 0.6 and len(new["eigenvalues"]) == 20
    assert new["step"] < first["step"] + 50
    assert request(server, "POST", f"/api/sessions/{sid}/pause")[0] == 200
    stream.frames(1, where=lambda f: f["status"] == "paused")
    stream.close()


def test_two_clients_get_their_own_sessions_and_a_third_a_clear_message(server):
    a, b = new_session(server), new_session(server)
    assert a != b
    status, err, _ = request(server, "POST", "/api/sessions", {})
    assert status == 503
    assert "maximum" in err["error"] and "close another tab" in err["error"]
    status, err, _ = request(server, "GET", "/api/sessions/nope")
    assert status == 404 and "reload the page" in err["error"]


def test_a_closed_tab_does_not_leak_its_training_thread(server):
    sid = new_session(server)
    stream = EventStream(server, sid)
    request(server, "POST", f"/api/sessions/{sid}/start")
    stream.frames(2, where=lambda f: f["status"] == "running")
    assert any(t.name.endswith(sid) for t in session_threads())
    stream.close()  # the tab goes away without saying goodbye
    deadline = time.monotonic() + 10
    while (server.sessions.get(sid) or any(t.name.endswith(sid) for t in session_threads())) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.sessions.get(sid) is None
    assert not any(t.name.endswith(sid) for t in session_threads())
    assert request(server, "GET", f"/api/sessions/{sid}")[0] == 404


def test_explicit_close_and_shutdown_join_every_thread():
    srv = make_server(port=0, reap_after=30, heartbeat=0.2).start()
    a, b = new_session(srv), new_session(srv)
    stream = EventStream(srv, b)
    request(srv, "POST", f"/api/sessions/{b}/start")
    stream.frames(1, where=lambda f: f["status"] == "running")
    assert request(srv, "POST", f"/api/sessions/{a}/close")[1] == {"closed": a}
    assert srv.sessions.get(a) is None
    srv.shutdown()  # with a stream still open and a session training
    stream.close()
    assert not session_threads()
    assert not [t for t in threading.enumerate() if t.name in ("tangentscope-http",
                                                               "tangentscope-reaper")]


def test_a_stalled_client_does_not_stall_training():
    srv = make_server(port=0, reap_after=30, heartbeat=0.2, stream_buffer=4096).start()
    try:
        sid = new_session(srv)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        sock.sendall(f"GET /api/sessions/{sid}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        request(srv, "POST", f"/api/sessions/{sid}/start")
        watcher = EventStream(srv, sid)  # a healthy client alongside the stalled one
        frames = watcher.frames(30, where=lambda f: f["status"] == "running")
        watcher.close()
        # the stalled client has not read a byte, yet training went on at full pace
        assert frames[-1]["step"] - frames[0]["step"] >= 29 * SMALL["steps_per_update"]
        got, deadline = b"", time.monotonic() + 5
        sock.settimeout(0.5)
        while time.monotonic() < deadline:  # now it reads what was queued for it, and more
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                continue
            got += chunk
            seen = [int(m) for m in re.findall(rb"\nid: (\d+)\n", got)]
            if not chunk or (seen and seen[-1] >= frames[-1]["_id"]):
                break
        sock.close()
    finally:
        srv.shutdown()
    ids = [int(m) for m in re.findall(rb"\nid: (\d+)\n", got)]
    assert ids and ids[-1] >= frames[-1]["_id"], got[:300]
    # it skipped the frames published while it was stalled: latest wins, no backlog
    assert len(ids) < 10 and max(b - a for a, b in zip(ids, ids[1:])) >= 20, ids


def test_latest_wins_a_slow_reader_skips_frames():
    s = Session("t", DemoConfig(**SMALL), max_fps=None)
    try:
        s.command("start")
        seen, t_end = [], time.monotonic() + 1.5
        while time.monotonic() < t_end:
            frame = s.wait_frame(seen[-1] if seen else 0, timeout=1.0)
            if frame:
                seen.append(frame[0])
            time.sleep(0.3)  # a slow browser
        assert len(seen) >= 3 and max(b - a for a, b in zip(seen, seen[1:])) > 1
    finally:
        s.close()
    assert not s.alive


def test_divergence_is_reported_and_reset_recovers(server):
    sid = new_session(server, optimizer="sgd", lr=10.0)
    stream = EventStream(server, sid)
    request(server, "POST", f"/api/sessions/{sid}/start")
    bad = stream.frames(1, timeout=60, where=lambda f: f["status"] == "diverged")[0]
    assert "lower the learning rate" in bad["message"]
    status, body, _ = request(server, "POST", f"/api/sessions/{sid}/config", {"lr": 0.01})
    assert status == 200 and body["applied"] == "live"
    request(server, "POST", f"/api/sessions/{sid}/reset")
    request(server, "POST", f"/api/sessions/{sid}/start")
    ok = stream.frames(1, where=lambda f: f["status"] == "running" and f["step"] > 0
                       and f["run"] > bad["run"])[0]
    stream.close()
    assert ok["train_loss"] is not None and ok["config"]["lr"] == 0.01
