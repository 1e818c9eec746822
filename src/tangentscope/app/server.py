"""The live page's HTTP server: static files, a JSON control API and server-sent events.

Standard library only (``http.server.ThreadingHTTPServer``); every asset is served from
``app/static/`` (no CDN). Routes::

    GET  /                              the page
    GET  /static/{index.html,app.js,plot.js,style.css}
    GET  /api/limits                    allowed control values, defaults, optimizers
    POST /api/sessions                  new session -> {"session": id, ...}    (503 when full)
    GET  /api/sessions/ID               latest status/step/config (JSON)
    GET  /api/sessions/ID/events        text/event-stream of ``state`` frames (latest wins)
    POST /api/sessions/ID/config        {"noise": 0.5, ...} -> {"config", "applied"} (400 if bad)
    POST /api/sessions/ID/start|pause|reset|close

Errors are JSON ``{"error": message, "field": ..., "allowed": {...}}`` with status 400 (bad
value), 404 (unknown session or path), 405, 413 or 503 (no free session slot).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..errors import ConfigError
from .model import LIMITS, ControlError, DemoConfig, allowed, available_optimizers, validate_config
from .session import Session, SessionLimitError, SessionManager

__all__ = ["AppServer", "make_server", "serve"]

STATIC = Path(__file__).with_name("static")
_FILES = {"index.html": "text/html; charset=utf-8",
          "app.js": "text/javascript; charset=utf-8",
          "plot.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8",
          "run.html": "text/html; charset=utf-8",      # the page of a recorded run (run_page)
          "run.js": "text/javascript; charset=utf-8"}
MAX_BODY = 16 * 1024
DEFAULT_LR = {"adamw": 3e-3, "gated-streaming": 3e-3, "sgd": 0.05}


_S = TypeVar("_S", bound="LocalServer")


class LocalServer(ThreadingHTTPServer):
    """A threaded HTTP server that serves in a daemon thread (``start()``) or the caller's
    (``serve_forever()``) and releases its port on ``shutdown()``: the base of both pages'
    servers."""

    daemon_threads = True
    allow_reuse_address = True
    thread_name = "tangentscope-http"
    #: the host named in :attr:`url` when bound to every interface (None: this machine's name)
    wildcard_host: str | None = None

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]):
        super().__init__(address, handler)
        self._thread: threading.Thread | None = None
        self._serving = False

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        addr = self.server_address[0]
        host = addr.decode() if isinstance(addr, bytes) else str(addr)
        if host in ("0.0.0.0", "::", ""):
            host = self.wildcard_host or socket.gethostname()
        return f"http://{host}:{self.port}/"

    def start(self: _S) -> _S:
        """Serve in a daemon thread; return ``self``."""
        self._thread = threading.Thread(target=self.serve_forever, name=self.thread_name,
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self, poll_interval: float = 0.25) -> None:
        self._serving = True
        try:
            super().serve_forever(poll_interval)
        finally:
            self._serving = False

    def serve_until_interrupted(self, what: str, *, open_browser: bool = True) -> None:
        """Serve in this thread until Ctrl-C (opening a browser tab where there is a display),
        then shut down; ``what`` names the page in the stop message."""
        if open_browser and _has_display():
            import webbrowser

            threading.Thread(target=_open, args=(webbrowser, self.url), daemon=True).start()
        try:
            self.serve_forever()
        except KeyboardInterrupt:
            print(f"\ntangentscope: stopping {what}", flush=True)
        finally:
            self.shutdown()

    def _before_shutdown(self) -> None:
        """Called first by :meth:`shutdown` (end streams, say)."""

    def _after_stop(self) -> None:
        """Called by :meth:`shutdown` once serving has stopped (close sessions, say)."""

    def shutdown(self) -> None:
        """Stop serving and release the port."""
        self._before_shutdown()
        if self._serving:
            super().shutdown()
        self._after_stop()
        if self._thread is not None:
            self._thread.join(5.0)
        self.server_close()


def check_port(port: Any) -> None:
    """Refuse a port outside 0..65535 (``0`` picks a free one) with a :class:`ConfigError`."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an integer in 0..65535 (0 picks a free one), got "
                          f"{port!r}")


def bind_error(host: str, port: int, e: OSError) -> ConfigError:
    """The error for an address this process cannot listen on (in use, not permitted, or an
    unknown host)."""
    return ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another "
                       "--port (0 picks a free one) or --host")


class AppServer(LocalServer):
    """The page's server. Build with :func:`make_server`; ``start()`` serves in a background
    thread, ``serve_forever()`` in the caller's; ``shutdown()`` stops serving and closes every
    session (joining its worker thread).

    Attributes:
        sessions: the :class:`~tangentscope.app.session.SessionManager`.
        heartbeat: seconds between keep-alive comments on idle event streams (this is also
            how quickly a closed tab is noticed).
        stream_buffer: socket send buffer (bytes) of an event stream: small, so that a slow
            client receives the newest frame rather than a backlog queued in the kernel.
        request_timeout: seconds a connection may take to send a request line, headers or
            body (an idle keep-alive connection, or a body shorter than its ``Content-Length``,
            frees its thread after this long).
        stream_timeout: seconds an event stream may wait for a client that reads nothing
            before it is dropped (the page reconnects by itself).
    """

    def __init__(self, address: tuple[str, int], *, max_sessions: int = 4,
                 reap_after: float = 5.0, heartbeat: float = 1.0, stream_buffer: int = 64 * 1024,
                 request_timeout: float = 10.0, stream_timeout: float = 60.0,
                 **session_kwargs: Any):
        self.stopping = threading.Event()     # before binding: a handler may look at it
        super().__init__(address, _Handler)
        self.sessions = SessionManager(max_sessions, reap_after, **session_kwargs)
        self.heartbeat = heartbeat
        self.stream_buffer = stream_buffer
        self.request_timeout = request_timeout
        self.stream_timeout = stream_timeout

    def _before_shutdown(self) -> None:   # end open event streams
        self.stopping.set()

    def _after_stop(self) -> None:        # close every session (joining its worker)
        self.sessions.shutdown()


def make_server(host: str = "127.0.0.1", port: int = 0, *, max_sessions: int = 4,
                reap_after: float = 5.0, heartbeat: float = 1.0, stream_buffer: int = 64 * 1024,
                request_timeout: float = 10.0, stream_timeout: float = 60.0,
                implementation: str = "auto", max_fps: float | None = 25.0) -> AppServer:
    """Bind the page's server (not yet serving: call ``.start()`` or ``.serve_forever()``).

    Args:
        host, port: address; ``port=0`` picks a free port (read it from ``.port``).
        max_sessions: concurrent pages (each trains in its own thread).
        reap_after: seconds after its last event stream closes that a session is ended.
        heartbeat: seconds between keep-alive comments on an idle event stream.
        stream_buffer: send-buffer bytes per event stream (a slow client gets fresh frames).
        request_timeout, stream_timeout: socket timeouts in seconds (see :class:`AppServer`).
        implementation: eNTK implementation for the spectrum (``"auto"``: the fastest).
        max_fps: cap on spectrum updates per second per session (``None``: uncapped).

    Raises:
        ConfigError: a port outside 0..65535, or one this process cannot listen on.
    """
    check_port(port)
    try:
        return AppServer((host, port), max_sessions=max_sessions, reap_after=reap_after,
                         heartbeat=heartbeat, stream_buffer=stream_buffer,
                         request_timeout=request_timeout, stream_timeout=stream_timeout,
                         implementation=implementation, max_fps=max_fps)
    except OSError as e:
        raise bind_error(host, port, e) from None


def serve(host: str = "127.0.0.1", port: int = 0, open_browser: bool = True, *,
          torch_threads: int | None = 1, **server_kwargs: Any) -> None:
    """Serve the live page until Ctrl-C, printing the address to open.

    Args:
        host, port: address (``port=0``: a free port, printed).
        open_browser: try to open the page in a browser (only where there is a display).
        torch_threads: ``torch.set_num_threads`` for this process (``None``: leave it). One
            intra-op thread is fastest for the page's small models, and sessions train in
            parallel threads; several intra-op threads on a busy machine slow small ops a lot.
        **server_kwargs: passed to :func:`make_server`.
    """
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    srv = make_server(host, port, **server_kwargs)
    print(f"tangentscope: the live page is at {srv.url}\n"
          f"Open {srv.url} in a browser (Ctrl-C to stop).", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("  (listening beyond this machine: anyone who can reach this port can use it)",
              flush=True)
    srv.serve_until_interrupted("the live page", open_browser=open_browser)


def _has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY")
                                                       or os.environ.get("WAYLAND_DISPLAY"))


def _open(webbrowser: Any, url: str) -> None:
    with contextlib.suppress(Exception):  # no browser is fine: the address was printed
        webbrowser.open(url)


class _Handler(BaseHTTPRequestHandler):
    server: AppServer
    server_version = "tangentscope"

    def setup(self) -> None:
        super().setup()
        # a socket timeout: a client that stops sending (idle keep-alive, short body) frees
        # this thread after ``request_timeout`` s instead of holding it for ever
        self.connection.settimeout(self.server.request_timeout)

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        if os.environ.get("TANGENTSCOPE_HTTP_LOG"):
            super().log_message(format, *args)

    # -- responses -----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None
              ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str, **extra: Any) -> None:
        self._json(status, {"error": message, **extra})

    def _body(self) -> Any:
        """The request's JSON value (``{}`` for an empty body; the routes check it is an
        object, with a :class:`ControlError` naming the allowed values).

        Raises:
            _HttpError: 400 for a ``Content-Length`` that is not a non-negative integer, a body
                shorter than it (or not sent within ``request_timeout``), or invalid or too
                deeply nested JSON; 413 for a body over ``MAX_BODY``.
        """
        text = (self.headers.get("Content-Length") or "").strip()
        if not text:
            n = 0
        elif not (text.isascii() and text.isdigit()):
            raise _HttpError(400, f"Content-Length must be the body's size in bytes, a "
                                  f"non-negative integer; got {text[:40]!r}")
        elif len(text) > 12 or int(text) > MAX_BODY:
            raise _HttpError(413, f"request body over {MAX_BODY} bytes (Content-Length "
                                  f"{text[:40]}); send a small JSON object")
        else:
            n = int(text)
        try:
            raw = self.rfile.read(n) if n else b""
        except TimeoutError:
            raw = None
        if raw is None or len(raw) < n:
            self.close_connection = True
            got = "no" if not raw else f"{len(raw)} of the"
            raise _HttpError(400, f"the request body ended after {got} {n} bytes its "
                                  "Content-Length announced (or did not arrive within "
                                  f"{self.server.request_timeout:g} s): send the whole body")
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _HttpError(400, "the request body is not valid JSON: send an object such as "
                                  '{"noise": 0.5}') from None
        except RecursionError:
            raise _HttpError(400, "the request body nests JSON too deeply: send a flat object "
                                  'such as {"noise": 0.5}') from None
        return body

    # -- routing -------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._error(405, "use GET or POST")

    do_DELETE = do_PATCH = do_PUT

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path
        parts = [p for p in path.split("/") if p]
        try:
            if method in ("GET", "HEAD") and path in ("/", "/index.html"):
                return self._static("index.html")
            if method in ("GET", "HEAD") and len(parts) == 2 and parts[0] == "static":
                return self._static(parts[1])
            if parts[:1] != ["api"]:
                raise _HttpError(404, f"no page at {path}; open / for the live page")
            if method == "HEAD":
                raise _HttpError(405, "use GET or POST for the API")
            return self._api(method, parts[1:])
        except _HttpError as e:
            self._error(e.status, e.message, **e.extra)
        except ControlError as e:
            self._error(400, str(e), field=e.field, allowed=e.allowed)
        except SessionLimitError as e:
            self._error(503, str(e))
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass
        except Exception as e:  # a bug: say so, keep serving
            traceback.print_exc()
            with contextlib.suppress(OSError):
                self._error(500, f"internal error ({type(e).__name__}: {e}); the server keeps "
                                 "running — please report this with the traceback it printed")

    def _static(self, name: str) -> None:
        if name not in _FILES:
            raise _HttpError(404, f"no static file {name!r}")
        self._send(200, (STATIC / name).read_bytes(), _FILES[name])

    def _api(self, method: str, parts: list[str]) -> None:
        if parts == ["limits"]:
            self._need(method, "GET")
            return self._json(200, limits_description())
        if parts == ["sessions"]:
            self._need(method, "POST")
            body = self._body()
            cfg = DemoConfig() if body == {} else validate_config(body)
            new = self.server.sessions.create(cfg)
            return self._json(201, {"session": new.id, "config": _asdict(cfg),
                                    "events": f"/api/sessions/{new.id}/events"})
        if len(parts) < 2 or parts[0] != "sessions":
            raise _HttpError(404, f"no API route /api/{'/'.join(parts)}")
        s = self.server.sessions.get(parts[1])
        if s is None:
            raise _HttpError(404, f"no session {parts[1]!r}: sessions end "
                                  f"{self.server.sessions.reap_after:g} s after their page closes;"
                                  " reload the page for a new one")
        action = parts[2] if len(parts) == 3 else None
        if len(parts) > 3:
            raise _HttpError(404, "no such API route")
        if action is None:
            self._need(method, "GET")
            return self._json(200, s.state())
        if action == "events":
            self._need(method, "GET")
            return self._stream(s)
        self._need(method, "POST")
        if action == "config":
            cfg, mode = s.configure(self._body())
            return self._json(200, {"config": _asdict(cfg), "applied": mode})
        if action == "close":
            self.server.sessions.close(s.id)
            return self._json(200, {"closed": s.id})
        if action in ("start", "pause", "reset"):
            s.command(action)
            return self._json(200, {"ok": action})
        raise _HttpError(404, f"unknown action {action!r}; use config, start, pause, reset or "
                              "close")

    def _need(self, method: str, want: str) -> None:
        if method != want:
            raise _HttpError(405, f"use {want} for {self.path}")

    def _stream(self, s: Session) -> None:
        """Server-sent events: the newest frame whenever this client is ready (latest wins)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                       self.server.stream_buffer)
            self.connection.settimeout(self.server.stream_timeout)
        s.attach()
        try:
            self.wfile.write(b"retry: 1000\n\n")
            self.wfile.flush()
            seen = 0
            while not self.server.stopping.is_set() and not s.closed:
                frame = s.wait_frame(seen, self.server.heartbeat)
                if frame is None:
                    self.wfile.write(b": keep-alive\n\n")
                else:
                    seen = frame[0]
                    self.wfile.write(b"event: state\nid: %d\ndata: %s\n\n" % frame)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError,
                OSError):
            pass
        finally:
            s.detach()
            self.close_connection = True


class _HttpError(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = HTTPStatus(status), message, extra


def _asdict(cfg: DemoConfig) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)


def limits_description() -> dict[str, Any]:
    """Allowed values of every control, the defaults and the optimizers (``/api/limits``)."""
    return {"limits": {k: {**allowed(k), "help": LIMITS[k].help} for k in LIMITS},
            "defaults": _asdict(DemoConfig()),
            "optimizers": available_optimizers(),
            "default_lr": {k: v for k, v in DEFAULT_LR.items() if k in available_optimizers()}}
