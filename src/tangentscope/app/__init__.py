"""The pages: the live page (a small ReLU MLP training on noisy 1-D regression, watched through
its eNTK) and the page of a recorded run.

``tangentscope app`` (or ``tangentscope demo``) calls :func:`serve`; ``tangentscope app RUN_DIR``
calls :func:`serve_run` (a recorded trajectory or run directory: spectra, channel split,
identity residuals, gate telemetry per snapshot). Tests and notebooks use :func:`make_server` /
:func:`make_run_server` and ``.start()`` to serve in a background thread. Standard library only
(``http.server`` + server-sent events); the pages' assets are in ``static/``.
"""

from .run_data import RunView, load_run
from .run_page import RunServer, make_run_server, serve_run
from .server import AppServer, make_server, serve
from .session import Session, SessionLimitError, SessionManager

__all__ = ["AppServer", "Session", "SessionLimitError", "SessionManager", "make_server", "serve",
           "RunServer", "RunView", "load_run", "make_run_server", "serve_run"]
