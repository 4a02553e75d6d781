"""Replica logging: an expected client error is one INFO line, not an ERROR with a traceback.

Ray Serve logs every exception that leaves a replica method (streaming ones included) with
``logger.exception("Request failed.")`` on its ``ray.serve`` logger, then re-raises it to the caller.
For a :class:`~app.errors.ServingError` below 500 (bad input, context too long) that is the client's
mistake, not a fault of the server: :class:`ClientErrorsAsInfo` rewrites such a record into one INFO line
naming the request id, status, code and message. Anything else (a real fault) keeps its ERROR and
traceback. The exception itself still reaches the caller unchanged.
"""

from __future__ import annotations

import logging

from app.errors import ServingError, current_request_id
from app.logs import SERVE_LOGGER, write_logs_at_once


def is_client_error(exc: BaseException | None) -> bool:
    return isinstance(exc, ServingError) and exc.status_code < 500


class ClientErrorsAsInfo(logging.Filter):
    """Turn an ERROR record carrying a client error (4xx ServingError) into a one-line INFO record."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno >= logging.ERROR and is_client_error(exc):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "request %s refused: %d %s: %s"
            record.args = (current_request_id(), exc.status_code, exc.code or exc.error_type, exc.message)
            record.exc_info = record.exc_text = record.stack_info = None
        return True


def install_client_error_filter(logger_name: str = SERVE_LOGGER) -> None:
    """Add :class:`ClientErrorsAsInfo` to ``logger_name`` once per process (idempotent), and have its
    records written at once (:func:`app.logs.write_logs_at_once`)."""
    write_logs_at_once(logger_name)
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, ClientErrorsAsInfo) for f in logger.filters):
        logger.addFilter(ClientErrorsAsInfo())
