"""Replica logging: buffered Serve log handlers write each record at once."""

import logging
import logging.handlers

from app.logs import write_logs_at_once


def test_buffering_handlers_write_each_record_at_once(tmp_path):
    target = logging.FileHandler(tmp_path / "serve.log")
    buffered = logging.handlers.MemoryHandler(capacity=1000, target=target, flushLevel=logging.ERROR)
    logger = logging.getLogger("test.serve.buffered")
    logger.addHandler(buffered)
    logger.setLevel(logging.INFO)
    try:
        write_logs_at_once("test.serve.buffered")
        logger.info("request abc refused: 400")
        assert "request abc refused" in (tmp_path / "serve.log").read_text()
    finally:
        logger.removeHandler(buffered)
        buffered.close()
