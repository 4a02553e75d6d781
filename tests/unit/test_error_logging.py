"""Issue #8 item 6: a client error is one INFO line with the request id; a server fault keeps its
ERROR and traceback (replica side: the filter on Ray Serve's logger; ingress side: log_error)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from app.errors import ContextLengthExceeded, InternalError, Overloaded, log_error
from deployments.logs import install_client_error_filter


def fail(logger: logging.Logger, exc: Exception) -> None:
    """What Ray Serve's replica does with an exception leaving a method: logger.exception, re-raise."""
    try:
        raise exc
    except Exception:
        logger.exception("Request failed.")


def test_a_client_error_leaving_a_replica_is_one_info_line(caplog, monkeypatch):
    monkeypatch.setattr("deployments.logs.current_request_id", lambda: "req-123")
    logger = logging.getLogger("test.replica.client")
    install_client_error_filter(logger.name)
    install_client_error_filter(logger.name)  # idempotent
    assert len(logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=logger.name):
        fail(logger, ContextLengthExceeded("too long", param="messages"))
    [record] = caplog.records
    assert record.levelno == logging.INFO and record.exc_info is None
    line = caplog.text.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "req-123" in line and "400 context_length_exceeded" in line and "too long" in line


def test_a_server_fault_leaving_a_replica_keeps_its_traceback(caplog):
    logger = logging.getLogger("test.replica.fault")
    install_client_error_filter(logger.name)
    with caplog.at_level(logging.INFO, logger=logger.name):
        fail(logger, RuntimeError("boom"))
        fail(logger, InternalError("also a fault"))
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.ERROR]
    assert caplog.text.count("Traceback") == 2 and "RuntimeError: boom" in caplog.text


def test_the_ingress_logs_client_errors_in_one_line_and_faults_with_a_traceback(caplog):
    logger = logging.getLogger("test.ingress")
    request = SimpleNamespace(method="POST", url=SimpleNamespace(path="/v1/chat/completions"))
    with caplog.at_level(logging.INFO, logger=logger.name):
        log_error(logger, request, ContextLengthExceeded("too long"), ContextLengthExceeded("too long"))
        log_error(logger, request, Overloaded("full"), Overloaded("full"))
        try:
            raise ValueError("bug")
        except ValueError as exc:
            log_error(logger, request, InternalError("unexpected"), exc)
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.INFO, logging.WARNING, logging.ERROR]
    assert [r.exc_info is not None for r in caplog.records] == [False, False, True]
    assert "answered 400 context_length_exceeded" in caplog.records[0].getMessage()
    assert caplog.text.count("Traceback") == 1 and "ValueError: bug" in caplog.text
