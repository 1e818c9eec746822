"""The live page: a small ReLU MLP training on noisy 1-D regression, watched through its eNTK.

``tangentscope app`` (or ``tangentscope demo``) calls :func:`serve`; tests and notebooks use
:func:`make_server` and ``.start()`` to run it in a background thread. Standard library only
(``http.server`` + server-sent events); the page's assets are in ``static/``.
"""

from .server import AppServer, make_server, serve
from .session import Session, SessionLimitError, SessionManager

__all__ = ["AppServer", "Session", "SessionLimitError", "SessionManager", "make_server", "serve"]
