"""Keeps the bench harness working: its load generator against the session's server, at tiny scale.

Speed is not asserted (the bench is not part of the suite's timing); only that the statistics are
well-formed: every request finished, tokens were counted from usage, latencies are ordered.
"""

import pytest

from bench.load import HttpDriver
from bench.prompts import make_prompts

pytestmark = pytest.mark.integration


async def test_load_generator_drives_the_streaming_endpoint(server):
    driver = HttpDriver(server, "demo-chat", timeout_s=60)
    prompts = make_prompts(6)
    await driver.warmup(prompts[:1], max_tokens=4)
    stats = await driver.run_level(prompts, concurrency=3, max_tokens=8)
    assert (stats.requests, stats.planned, stats.errors) == (6, 6, 0), stats.first_error
    assert stats.tokens_counted == "usage"
    assert 6 <= stats.output_tokens <= 6 * 8
    assert stats.tokens_per_s > 0 and stats.requests_per_s > 0
    assert 0 < stats.ttft_p50 <= stats.ttft_p99 <= stats.e2e_p99
    assert stats.e2e_p50 <= stats.e2e_p99


async def test_load_generator_reports_failures_as_errors(server):
    stats = await HttpDriver(server, "no-such-model", timeout_s=30).run_level(make_prompts(2), 2, 4)
    assert stats.errors == 2 and stats.requests == 2 and "HTTP 404" in stats.first_error
    assert stats.tokens_per_s == 0 and stats.ttft_p50 is None


async def test_image_requests_carry_a_new_image_each_and_run_to_max_tokens(server):
    """bench/vision.py's driver: every image request gets its own image; ignore_eos makes each run to max_tokens."""
    from bench.vision import PROMPT_TOKENS, ImageHttpDriver, image_pool, with_slot

    pool = image_pool(8, 448)
    assert len(set(pool)) == 8
    driver = ImageHttpDriver(HttpDriver(server, "demo-vlm", timeout_s=120), iter(pool), tf_serve=False,
                             tag=("smoke", "demo-vlm"))
    prompts = [with_slot(m) for m in make_prompts(4)]
    await driver.warmup(prompts[:1], max_tokens=4)  # one image streamed, one image + one text unstreamed
    stats = await driver.run_level(prompts, concurrency=2, max_tokens=8)
    assert (stats.requests, stats.errors) == (4, 0), stats.first_error
    assert stats.output_tokens == 4 * 8 and stats.tokens_counted == "usage"
    image, text = PROMPT_TOKENS[("smoke", "demo-vlm")]
    assert image - text == 256 + 2  # a 448x448 image: 256 Qwen2-VL image tokens and its two vision markers
    assert next(driver.images, None) == pool[6]  # 6 images sent so far (1 warm-up, 1 count, 4 measured)
