"""The one-row product kernel computes ``x @ weight.T + bias`` up to float rounding for any shape, is
built once and cached, shares torch's OpenMP runtime, declines what it cannot serve, and is optional:
without a C compiler the lean step keeps oneDNN's product and decodes the same tokens."""

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deployments.engines import row_kernel
from deployments.engines.row_kernel import row_product

from .test_fast_decode import FAMILY_MODELS, assert_same_decoding, decode_steps

needs_compiler = pytest.mark.skipif(row_kernel._library() is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """An empty kernel cache and no loaded library; restored afterwards."""
    monkeypatch.setenv("SERVE_TRANSFORMERS_CACHE", str(tmp_path))
    row_kernel._library.cache_clear()
    yield tmp_path / "kernels"
    row_kernel._library.cache_clear()


@needs_compiler
@pytest.mark.parametrize("out", [1, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("inner", [1, 7, 8, 9, 24, 61])
@pytest.mark.parametrize("with_bias", [False, True])
def test_products_equal_linear(out, inner, with_bias):
    torch.manual_seed(out * 100 + inner)
    weight, x = torch.randn(out, inner), torch.randn(1, inner)
    bias = torch.randn(out) if with_bias else None
    got = row_product(weight, bias)(x)
    assert got.shape == (1, out) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_a_model_sized_product_on_every_thread_count():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(2816, 512) * 0.05, torch.randn(2816), torch.randn(1, 1024)[:, ::2]
    product, expected = row_product(weight, bias), F.linear(x, weight, bias)  # x: a strided view
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            torch.testing.assert_close(product(x), expected, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@needs_compiler
def test_refuses_an_input_it_would_read_past():
    product = row_product(torch.randn(4, 8))
    for bad in (torch.randn(2, 8), torch.randn(1, 7), torch.randn(1, 8, dtype=torch.float64)):
        with pytest.raises(ValueError):
            product(bad)


@needs_compiler
def test_one_openmp_runtime_in_the_process():
    """The kernel's OpenMP is torch's own: a second runtime would run a second team of threads."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc on this platform")
    assert len(row_kernel._openmp_mappings()) == 1


def test_declines_what_it_cannot_serve():
    weight = torch.randn(8, 16)
    assert row_product(weight.to(torch.bfloat16)) is None
    assert row_product(weight.t()) is None  # not contiguous: a copy would add memory
    assert row_product(weight, torch.randn(7)) is None  # bias of the wrong length
    assert row_product(weight, torch.randn(8, dtype=torch.float64)) is None


@needs_compiler
def test_built_once_per_machine_and_reused(fresh_kernel):
    assert row_product(torch.randn(4, 8)) is not None
    (built,) = fresh_kernel.glob("*.so")
    stamp = built.stat().st_mtime_ns
    row_kernel._library.cache_clear()
    assert row_product(torch.randn(4, 8)) is not None
    assert [p.name for p in fresh_kernel.iterdir()] == [built.name]  # no scratch files left behind
    assert built.stat().st_mtime_ns == stamp


def test_no_compiler_means_oneDNN_and_the_same_tokens(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.INFO, logger=row_kernel.__name__):
        assert row_product(torch.randn(4, 8)) is None
    assert "no C compiler" in caplog.text
    model = FAMILY_MODELS["qwen2"]()
    from deployments.engines.fast_decode import fast_decoder

    without = fast_decoder(model)
    assert without.row_products == 0
    row_kernel._library.cache_clear()
    monkeypatch.delenv("CC")
    with_kernel = fast_decoder(model)
    if row_kernel._library() is not None:
        assert with_kernel.row_products == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the head
    prompts = [[5, 6, 7, 8, 9]]
    assert_same_decoding(decode_steps(model, prompts, without, steps=20),
                         decode_steps(model, prompts, with_kernel, steps=20))
    assert fast_decoder(model, row_kernel=False).row_products == 0
