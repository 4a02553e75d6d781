"""Serve's request-path logs are written as they happen, in every replica of the app.

Ray Serve's throughput-optimized mode (README: "The serving path") buffers a replica's request-path log
records in a ``MemoryHandler`` of 1,000 records, flushed early only by an ERROR. On a quiet server a
refused request's INFO line, or an access log line, would then not reach the log file for hours; the
write per record costs microseconds next to the milliseconds a request costs. :func:`write_logs_at_once`
sets that buffer to one record; replicas call it when they start.
"""

from __future__ import annotations

import logging
import logging.handlers

SERVE_LOGGER = "ray.serve"  # Ray Serve's replica logger (request ids, access log, failed requests)


def write_logs_at_once(logger_name: str = SERVE_LOGGER) -> None:
    """Make every buffering handler of ``logger_name`` write each record at once (idempotent)."""
    for handler in logging.getLogger(logger_name).handlers:
        if isinstance(handler, logging.handlers.MemoryHandler):
            handler.capacity = 1
