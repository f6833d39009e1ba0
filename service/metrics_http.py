"""The metrics port: `/metrics` and nothing else.

prometheus_client's own server answers every path with the metrics page, so an
HTTP probe pointed at this port by mistake (say `/v2/health/ready`) would always
pass. Here any other path is 404. The page itself, its content negotiation and
compression are prometheus_client's WSGI application.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

METRICS_PATH = "/metrics"
NOT_FOUND = b"not found: this port serves /metrics only\n"

StartResponse = Callable[..., Any]
Application = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


def only_metrics(metrics: Application) -> Application:
    def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response(
                "404 Not Found",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(NOT_FOUND))),
                ],
            )
            return [NOT_FOUND]
        return metrics(environ, start_response)

    return application


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int
) -> tuple[WSGIServer, threading.Thread]:
    """Listen on host:port (port 0: a free one) in a daemon thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True

    server = make_server(
        host, port, only_metrics(make_wsgi_app(registry)), Server, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread
