"""The page of a recorded run: ``tangentscope app RUN_DIR``.

The run directory is read and analysed once (:func:`~tangentscope.app.run_data.load_run`), then
served read-only by the standard library's HTTP server, every asset from ``app/static/``::

    GET /                                   the page (run.html)
    GET /static/{run.html,run.js,plot.js,style.css}
    GET /api/run                            the run: trajectories (series per snapshot),
                                            metric columns, experiment, summary
    GET /api/run/snapshots/K?trajectory=T   snapshot K of trajectory T: K_SS spectrum and
                                            residual energies, the W_S channel split,
                                            identity residuals
    GET /api/run/metrics?column=C           metrics.csv column C against the step, per group

Every parameter is checked on the server: a bad one gets HTTP 400 with
``{"error": message, "field": name, "allowed": {...}}``; unknown paths 404, other methods 405.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .run_data import RunView, load_run
from .server import (
    _FILES,
    STATIC,
    LocalServer,
    _Handler,
    _HttpError,
    bind_error,
    check_port,
)

__all__ = ["RunServer", "make_run_server", "serve_run"]

_RUN_FILES = {"run.html", "run.js", "plot.js", "style.css"}


class RunServer(LocalServer):
    """Serves one :class:`~tangentscope.app.run_data.RunView`. Build with
    :func:`make_run_server`; ``start()`` serves in a background thread, ``shutdown()`` stops.

    Attributes:
        view: the analysed run.
        request_timeout: seconds a connection may take to send its request.
    """

    thread_name = "tangentscope-run-http"
    wildcard_host = "localhost"

    def __init__(self, address: tuple[str, int], view: RunView, *,
                 request_timeout: float = 10.0):
        super().__init__(address, _RunHandler)
        self.view = view
        self.request_timeout = request_timeout


def make_run_server(run_dir: str | os.PathLike | RunView, host: str = "127.0.0.1",
                    port: int = 0, *, request_timeout: float = 10.0) -> RunServer:
    """Analyse ``run_dir`` and bind its page's server (call ``.start()`` or ``.serve_forever()``).

    Raises:
        ConfigError: ``run_dir`` holds no run (see :func:`~tangentscope.app.run_data.load_run`),
            or a port outside 0..65535 / one this process cannot listen on.
    """
    check_port(port)
    view = run_dir if isinstance(run_dir, RunView) else load_run(Path(run_dir))
    try:
        return RunServer((host, port), view, request_timeout=request_timeout)
    except OSError as e:
        raise bind_error(host, port, e) from None


def serve_run(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
              open_browser: bool = True) -> None:
    """Serve the page of ``run_dir`` until Ctrl-C, printing the address to open."""
    print(f"tangentscope: reading {run_dir} ...", flush=True)
    srv = make_run_server(run_dir, host, port)
    n = len(srv.view.trajectories)
    print(f"tangentscope: the page of {run_dir} ({n} trajector{'y' if n == 1 else 'ies'}, "
          f"{len(srv.view.metrics)} metric rows) is at {srv.url}\n"
          f"Open {srv.url} in a browser (Ctrl-C to stop).", flush=True)
    srv.serve_until_interrupted("the page", open_browser=open_browser)


class _RunHandler(_Handler):
    server: RunServer  # type: ignore[assignment]

    def do_POST(self) -> None:
        self._safe(lambda: self._error(405, "this page is read-only: use GET"))

    def _route(self, method: str) -> None:
        self._safe(lambda: self._dispatch(method))

    def _safe(self, fn: Any) -> None:
        try:
            fn()
        except _HttpError as e:
            self._error(e.status, e.message, **e.extra)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass
        except Exception as e:  # a bug: say so, keep serving
            traceback.print_exc()
            with contextlib.suppress(OSError):
                self._error(500, f"internal error ({type(e).__name__}: {e}); the server keeps "
                                 "running — please report this with the traceback it printed")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        if parts in ([], ["index.html"], ["run.html"]):
            return self._file("run.html")
        if len(parts) == 2 and parts[0] == "static":
            if parts[1] not in _RUN_FILES:
                raise _HttpError(404, f"no static file {parts[1]!r}")
            return self._file(parts[1])
        if parts[:2] != ["api", "run"]:
            raise _HttpError(404, f"no page at {url.path}; open / for the run's page")
        if method == "HEAD":
            raise _HttpError(405, "use GET for the API")
        query = _query(url.query)
        view = self.server.view
        if parts == ["api", "run"]:
            _only(query, set())
            return self._json(200, view.overview())
        if parts == ["api", "run", "metrics"]:
            _only(query, {"column"})
            col = query.get("column")
            if col not in view.columns:
                raise _HttpError(400, f"column must be one of the numeric columns of "
                                      f"metrics.csv, got {col!r}", field="column",
                                 allowed={"type": "choice", "choices": view.columns})
            return self._json(200, view.series(col))
        if len(parts) == 4 and parts[2] == "snapshots":
            _only(query, {"trajectory"})
            names = list(view.trajectories)
            name = query.get("trajectory", names[0] if len(names) == 1 else None)
            if name not in view.trajectories:
                raise _HttpError(400, f"trajectory must be one of {names}, got {name!r}",
                                 field="trajectory", allowed={"type": "choice", "choices": names})
            t = view.trajectories[name]
            S = len(t.snapshots)
            if not S:
                raise _HttpError(400, f"trajectory {name!r} was not analysed: {t.note}",
                                 field="trajectory", allowed={"type": "choice", "choices": [
                                     n for n, v in view.trajectories.items() if v.snapshots]})
            k = parts[3]
            if not (k.isascii() and k.isdigit() and len(k) <= 9 and int(k) < S):
                raise _HttpError(400, f"snapshot must be an integer 0 ≤ k ≤ {S - 1} (the "
                                      f"trajectory has {S} snapshots), got {k[:40]!r}",
                                 field="snapshot", allowed={"type": "int", "min": 0,
                                                            "max": S - 1})
            return self._json(200, {"trajectory": name, **t.snapshots[int(k)]})
        raise _HttpError(404, f"no API route {url.path}")

    def _file(self, name: str) -> None:
        self._send(200, (STATIC / name).read_bytes(), _FILES[name])


def _query(text: str) -> dict[str, str]:
    """The query string as a dict (each key once).

    Raises:
        _HttpError: 400 for a malformed query or a repeated key.
    """
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text),
                          max_num_fields=8)
    except ValueError:
        raise _HttpError(400, f"malformed query string {text[:60]!r}: use ?key=value") from None
    out: dict[str, str] = {}
    for k, v in pairs:
        if k in out:
            raise _HttpError(400, f"query parameter {k!r} given twice", field=k)
        out[k] = v
    return out


def _only(query: dict[str, str], allowed: set[str]) -> None:
    bad = sorted(set(query) - allowed)
    if bad:
        raise _HttpError(400, f"unknown query parameter {bad[0]!r}; this route takes "
                              f"{sorted(allowed) or 'none'}", field=bad[0],
                         allowed={"type": "choice", "choices": sorted(allowed)})

