"""Live training sessions: one worker thread per page, latest-wins frames, reaping.

A :class:`Session` owns a :class:`~tangentscope.app.model.DemoTrainer` and a worker thread that
trains in chunks of ``steps_per_update`` steps, computes the eNTK spectrum after each chunk and
publishes the result as one JSON frame into a single slot (*latest wins*): event streams read
the newest frame whenever they are ready, so a slow browser drops frames instead of stalling
training. Controls are validated in the caller's thread (bad values raise
:class:`~tangentscope.app.model.ControlError` and change nothing) and applied by the worker between
chunks. :class:`SessionManager` caps the number of sessions and reaps those whose event streams
have all been gone for ``reap_after`` seconds, joining their threads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import threading
import time
import traceback
from typing import Any

from ..errors import NonFiniteError, TangentscopeError
from .model import (
    ControlError,
    DemoConfig,
    DemoTrainer,
    Snapshot,
    available_optimizers,
    numerical_zero,
    validate_config,
)

__all__ = ["Session", "SessionManager", "SessionLimitError"]

LIVE_FIELDS = frozenset({"lr", "max_steps", "steps_per_update"})  # applied without a reset
HISTORY_CAP = 1000


class SessionLimitError(TangentscopeError):
    """Every session slot is taken."""


def _r(v: float) -> float | None:
    """6 significant digits; NaN/Inf become ``None`` (JSON has no NaN)."""
    v = float(v)
    return float(f"{v:.6g}") if math.isfinite(v) else None


def _rs(a: Any) -> list[float | None]:
    return [_r(v) for v in a]


class Session:
    """One page's training run (see module docstring).

    Args:
        sid: the session id (in the page's URLs).
        config: the starting configuration (validated).
        implementation: eNTK implementation for the spectrum (``"auto"``: the fastest).
        max_fps: cap on spectrum updates per second (``None``: as fast as possible).
    """

    def __init__(self, sid: str, config: DemoConfig | None = None, *,
                 implementation: str = "auto", max_fps: float | None = 25.0):
        self.id = sid
        self.implementation = implementation
        self.min_interval = 1.0 / max_fps if max_fps else 0.0
        self.created = time.monotonic()
        self.last_detach = self.created
        self.streams = 0
        self._config = config or DemoConfig()
        self._cond = threading.Condition()
        self._commands: list[tuple[str, Any]] = []
        self._closed = False
        self._frame: tuple[int, bytes] | None = None
        self._version = 0
        self._state: dict[str, Any] = {"status": "starting", "step": 0}
        self._optimizers = available_optimizers()
        self._thread = threading.Thread(target=self._run, name=f"tangentscope-session-{sid}",
                                        daemon=True)
        self._thread.start()

    # -- called from request threads ---------------------------------------------------------
    @property
    def config(self) -> DemoConfig:
        return self._config

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def closed(self) -> bool:
        return self._closed

    def state(self) -> dict[str, Any]:
        """Status, step and config of the latest frame (cheap; for the API and tests)."""
        with self._cond:
            return dict(self._state)

    def command(self, action: str) -> None:
        """``"start"``, ``"pause"`` or ``"reset"`` (rebuild from the current config)."""
        if action not in ("start", "pause", "reset"):
            raise ControlError("action", f"unknown action {action!r}; use start, pause or reset",
                               {"type": "choice", "choices": ["start", "pause", "reset"]})
        self._enqueue(action, None)

    def configure(self, updates: dict[str, Any]) -> tuple[DemoConfig, str]:
        """Validate and apply control values.

        ``lr``, ``max_steps`` and ``steps_per_update`` apply to the running training; any other
        change restarts it from step 0 with the new data/model/optimizer (keeping run/pause).

        Returns:
            ``(new config, "live" | "reset" | "unchanged")``.

        Raises:
            ControlError: a bad value; nothing changes.
        """
        with self._cond:
            new = validate_config(updates, self._config)
            changed = {f.name for f in dataclasses.fields(new)
                       if getattr(new, f.name) != getattr(self._config, f.name)}
            if not changed:
                return new, "unchanged"
            mode = "live" if changed <= LIVE_FIELDS else "reset"
            self._config = new
            self._commands.append(("config", (new, mode)))
            self._cond.notify_all()
            return new, mode

    def wait_frame(self, after: int, timeout: float) -> tuple[int, bytes] | None:
        """The latest frame if newer than ``after``, waiting up to ``timeout`` s; else ``None``."""
        with self._cond:
            if not (self._frame and self._frame[0] > after) and not self._closed:
                self._cond.wait_for(lambda: self._closed or (self._frame is not None
                                                             and self._frame[0] > after),
                                    timeout=timeout)
            if self._frame and self._frame[0] > after:
                return self._frame
            return None

    def attach(self) -> None:
        with self._cond:
            self.streams += 1

    def detach(self) -> None:
        with self._cond:
            self.streams -= 1
            self.last_detach = time.monotonic()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker and join its thread (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _enqueue(self, action: str, arg: Any) -> None:
        with self._cond:
            self._commands.append((action, arg))
            self._cond.notify_all()

    # -- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        self.trainer: DemoTrainer | None = None
        self._snap: Snapshot | None = None
        self._running = False
        self._history: dict[str, list[float | None]] = {}
        self._static: dict[str, Any] = {}
        self._run_id = 0
        self._fps = 0.0
        self._last_publish = 0.0
        self._stop_at = 0
        pending: list[tuple[str, Any]] = [("reset", None)]
        while True:
            try:
                for action, arg in pending:
                    self._apply(action, arg)
                if self._running:
                    self._chunk()
            except Exception as e:  # shown on the page; reset may recover
                traceback.print_exc()
                self._running = False
                self._publish(self._snap, "error", f"{type(e).__name__}: {e}")
            with self._cond:
                if not self._closed and not self._commands and not self._running:
                    self._cond.wait_for(lambda: self._closed or bool(self._commands))
                if self._closed:
                    self.trainer = None
                    return
                pending, self._commands = self._commands, []

    def _build(self, cfg: DemoConfig) -> None:
        self._publish(None, "starting", "building the model and the first spectrum…")
        self.trainer, self._snap = None, None
        self.trainer = DemoTrainer(cfg, implementation=self.implementation)
        self._run_id += 1
        self._stop_at = cfg.max_steps
        self._history = {"step": [], "train": [], "test": [], "reservoir": []}
        d = self.trainer.data
        self._static = {"x": _rs(d.x.reshape(-1)), "y": _rs(d.y.reshape(-1)),
                        "x_test": _rs(d.x_test.reshape(-1)), "y_test": _rs(d.y_test.reshape(-1))}
        self._snap = self.trainer.snapshot()
        self._record(self._snap)
        self._publish(self._snap, "running" if self._running else "ready", "")

    def _apply(self, action: str, arg: Any) -> None:
        if action == "reset":
            self._build(self._config)
            return
        tr = self.trainer
        if tr is None:  # the first build failed: only reset (with other values) can help
            raise TangentscopeError("no model to train; change a control or press reset")
        if action == "start":
            if tr.step >= self._stop_at:
                self._stop_at = tr.step + tr.cfg.max_steps
            self._running, self._last_publish = True, 0.0
            self._publish(self._snap, "running", "")
        elif action == "pause":
            self._running = False
            self._publish(self._snap, "paused", "")
        elif action == "config":
            cfg, mode = arg
            if mode == "reset":
                self._build(cfg)
                return
            self._stop_at = max(tr.step, self._stop_at + cfg.max_steps - tr.cfg.max_steps)
            tr.set_lr(cfg.lr)
            tr.cfg = cfg
            self._publish(self._snap, "running" if self._running else "paused", "")

    def _chunk(self) -> None:
        tr = self.trainer
        assert tr is not None
        todo = min(tr.cfg.steps_per_update, self._stop_at - tr.step)
        try:
            if todo > 0:
                for _ in range(todo):  # step by step: big models stay responsive to controls
                    tr.train(1)
                    if self._commands or self._closed:
                        break
                if self._closed:
                    return
                self._snap = tr.snapshot()
                self._record(self._snap)
        except NonFiniteError as e:
            self._running = False
            self._publish(self._snap, "diverged", str(e))
            return
        if tr.step >= self._stop_at:
            self._running = False
            self._publish(self._snap, "done", f"finished {tr.step} steps; press start to train "
                                              f"{tr.cfg.max_steps} more")
            return
        now = time.monotonic()
        if self._last_publish:
            rate = 1.0 / max(now - self._last_publish, 1e-9)
            self._fps = rate if not self._fps else 0.8 * self._fps + 0.2 * rate
        self._last_publish = now
        self._publish(self._snap, "running", "")
        wait = self.min_interval - (time.monotonic() - now)
        if wait > 0:  # pace the updates, but wake at once for a command or close
            with self._cond:
                self._cond.wait_for(lambda: self._closed or bool(self._commands), timeout=wait)

    def _record(self, s: Snapshot) -> None:
        h = self._history
        h["step"].append(s.step)
        h["train"].append(_r(s.train_loss))
        h["test"].append(_r(s.test_loss))
        h["reservoir"].append(_r(s.reservoir_fraction))
        if len(h["step"]) > HISTORY_CAP:  # thin to every other point, keeping the newest
            for k in h:
                h[k] = h[k][-1::-2][::-1]

    def _publish(self, s: Snapshot | None, status: str, message: str) -> None:
        cfg = self._config
        frame: dict[str, Any] = {"session": self.id, "status": status, "message": message,
                                 "config": dataclasses.asdict(cfg),
                                 "optimizers": self._optimizers,
                                 "run": getattr(self, "_run_id", 0)}
        if s is not None:
            lam = s.eigenvalues
            frame.update({
                "step": s.step, "stop_at": self._stop_at, "t_eff": _r(s.t_eff),
                "train_loss": _r(s.train_loss), "test_loss": _r(s.test_loss),
                "threshold": _r(s.threshold), "reservoir_fraction": _r(s.reservoir_fraction),
                "eigenvalues": _rs(lam), "energies": _rs(s.energies),
                "noise_energies": _rs(s.noise_energies),
                "zero": _r(numerical_zero(lam)),
                "gd_lr_max": _r(2 * len(lam) / lam[0]) if lam[0] > 0 else None,
                "fit": _rs(s.fit), "data": self._static, "history": self._history,
                "timing": {"spectrum_ms": _r(1e3 * s.spectrum_seconds),
                           "updates_per_s": _r(self._fps) if status == "running" else None},
            })
        payload = json.dumps(frame, separators=(",", ":")).encode()
        with self._cond:
            self._version += 1
            self._frame = (self._version, payload)
            self._state = {"status": status, "message": message,
                           "step": s.step if s is not None else 0,
                           "config": frame["config"], "frame": self._version}
            self._cond.notify_all()


class SessionManager:
    """Creates sessions (at most ``max_sessions``) and reaps abandoned ones.

    Args:
        max_sessions: live sessions allowed at once.
        reap_after: seconds a session may have no open event stream before it is closed.
        **session_kwargs: passed to :class:`Session`.
    """

    def __init__(self, max_sessions: int = 4, reap_after: float = 5.0, **session_kwargs: Any):
        self.max_sessions = max_sessions
        self.reap_after = reap_after
        self._kwargs = session_kwargs
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="tangentscope-reaper",
                                        daemon=True)
        self._reaper.start()

    def create(self, config: DemoConfig | None = None) -> Session:
        """A new session with its worker thread started.

        Raises:
            SessionLimitError: ``max_sessions`` are live; the message says how to free one.
        """
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise SessionLimitError(
                    f"this server already runs {len(self._sessions)} live training sessions, its "
                    f"maximum: close another tab of this page (its session ends "
                    f"{self.reap_after:g} s after the tab closes) and reload, or start another "
                    "server with `tangentscope app`")
            s = Session(secrets.token_urlsafe(9), config, **self._kwargs)
            self._sessions[s.id] = s
            return s

    def get(self, sid: str) -> Session | None:
        with self._lock:
            return self._sessions.get(sid)

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def close(self, sid: str) -> bool:
        with self._lock:
            s = self._sessions.pop(sid, None)
        if s is None:
            return False
        s.close()
        return True

    def reap(self) -> list[str]:
        """Close sessions without an event stream for ``reap_after`` s, or whose worker died."""
        now = time.monotonic()
        with self._lock:
            dead = [sid for sid, s in self._sessions.items()
                    if not s.alive or (s.streams <= 0 and now - s.last_detach > self.reap_after)]
        for sid in dead:
            self.close(sid)
        return dead

    def shutdown(self) -> None:
        """Close every session and stop the reaper."""
        self._stop.set()
        for s in self.sessions():
            self.close(s.id)
        if threading.current_thread() is not self._reaper:
            self._reaper.join(5.0)

    def _reap_loop(self) -> None:
        while not self._stop.wait(min(0.25, self.reap_after / 4)):
            self.reap()
