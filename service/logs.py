"""The service's one logging configuration, with the request id on every request's lines.

The id comes from the client's `x-request-id` metadata or is generated, lives in
a context variable for the request's task (and, while its batch runs, in the
worker thread), and a filter copies it onto every record. `--log-format json`
writes one JSON object per line; the access log (`--access-log`, off by
default) is one line per inference request on the `batchwise.access` logger.
"""

from __future__ import annotations

import contextvars
import json
import logging
import random
import sys
import time

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
ACCESS_LOGGER = "batchwise.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def new_request_id() -> str:
    # 64 random bits from the process's PRNG: an id to correlate log lines, not a secret,
    # so it needs no system call per request as uuid4 does.
    return f"{random.getrandbits(64):016x}"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", "")
        return f"{text} [request_id={request_id}]" if request_id else text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            entry["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: int, log_format: str = "text", access_log: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # grpc and onnxruntime are chatty at INFO; their warnings still show.
    logging.getLogger("grpc").setLevel(max(level, logging.WARNING))
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if access_log else logging.WARNING)
