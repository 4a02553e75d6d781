"""The product kernel computes ``x @ weight.T + bias`` up to float rounding for any shape and row count,
is built once and cached, shares torch's OpenMP runtime, declines what it cannot serve, and is optional:
without a C compiler the lean step keeps oneDNN's product and decodes the same tokens."""

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deployments.engines import product_kernel
from deployments.engines.fast_decode import fast_decoder
from deployments.engines.product_kernel import KERNEL_ROWS, pack_panels, panel_product

from .test_fast_decode import FAMILY_MODELS, assert_same_decoding, decode_steps

needs_compiler = pytest.mark.skipif(product_kernel._library() is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """An empty kernel cache and no loaded library; restored afterwards."""
    monkeypatch.setenv("SERVE_TRANSFORMERS_CACHE", str(tmp_path))
    product_kernel._library.cache_clear()
    yield tmp_path / "kernels"
    product_kernel._library.cache_clear()


@needs_compiler
@pytest.mark.parametrize("out", [1, 5, 15, 16, 17, 40])
@pytest.mark.parametrize("inner", [1, 7, 24, 61])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 20])
@pytest.mark.parametrize("with_bias", [False, True])
def test_products_equal_linear(out, inner, rows, with_bias):
    """Every panel width (a last panel of 1 to 16 outputs), every per-count function and more than one
    group of 8 rows."""
    torch.manual_seed(out * 1000 + inner * 10 + rows)
    weight, x = torch.randn(out, inner), torch.randn(rows, inner)
    bias = torch.randn(out) if with_bias else None
    got = panel_product(weight, bias)(x)
    assert got.shape == (rows, out) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_a_model_sized_product_on_every_thread_count():
    torch.manual_seed(0)
    weight, bias = torch.randn(2816, 512) * 0.05, torch.randn(2816)
    x = torch.randn(KERNEL_ROWS, 1024)[:, ::2]  # a strided view
    product, expected = panel_product(weight, bias), F.linear(x, weight, bias)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            torch.testing.assert_close(product(x), expected, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@needs_compiler
def test_leading_dimensions_and_no_rows():
    weight = torch.randn(20, 12)
    product = panel_product(weight)
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(product(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert product(torch.randn(0, 12)).shape == (0, 20)


def test_panels_hold_the_weights_input_major():
    weight = torch.arange(17 * 3, dtype=torch.float32).view(17, 3)
    panels = pack_panels(weight)
    assert panels.shape == (2, 3, 16)
    assert panels[0, 2, 5] == weight[5, 2] and panels[1, 1, 0] == weight[16, 1]
    assert (panels[1, :, 1:] == 0).all()  # outputs past ``out`` are zero


@needs_compiler
def test_refuses_an_input_it_would_read_past():
    product = panel_product(torch.randn(4, 8))
    for bad in (torch.randn(2, 7), torch.randn(1, 9), torch.randn(1, 8, dtype=torch.float64), torch.tensor(1.0)):
        with pytest.raises(ValueError):
            product(bad)


@needs_compiler
def test_one_openmp_runtime_in_the_process():
    """The kernel's OpenMP is torch's own: a second runtime would run a second team of threads."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc on this platform")
    assert len(product_kernel._openmp_mappings()) == 1


def test_declines_what_it_cannot_serve():
    weight = torch.randn(8, 16)
    assert panel_product(weight.to(torch.bfloat16)) is None
    assert panel_product(weight[0]) is None  # not a matrix
    assert panel_product(weight, torch.randn(7)) is None  # bias of the wrong length
    assert panel_product(weight, torch.randn(8, dtype=torch.float64)) is None


@needs_compiler
def test_built_once_per_machine_and_reused(fresh_kernel):
    assert panel_product(torch.randn(4, 8)) is not None
    (built,) = fresh_kernel.glob("*.so")
    stamp = built.stat().st_mtime_ns
    product_kernel._library.cache_clear()
    assert panel_product(torch.randn(4, 8)) is not None
    assert [p.name for p in fresh_kernel.iterdir()] == [built.name]  # no scratch files left behind
    assert built.stat().st_mtime_ns == stamp


def test_no_compiler_means_oneDNN_and_the_same_tokens(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.INFO, logger=product_kernel.__name__):
        assert panel_product(torch.randn(4, 8)) is None
    assert "no C compiler" in caplog.text
    model = FAMILY_MODELS["qwen2"]()
    without = fast_decoder(model)
    assert without.kernel_products == 0
    product_kernel._library.cache_clear()
    monkeypatch.delenv("CC")
    with_kernel = fast_decoder(model)
    if product_kernel._library() is not None:
        assert with_kernel.kernel_products == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the head
        assert with_kernel.packed_bytes > without.packed_bytes  # the panels are a copy of their own
    for prompts in ([[5, 6, 7, 8, 9]], [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]):
        assert_same_decoding(decode_steps(model, prompts, without, steps=20),
                             decode_steps(model, prompts, with_kernel, steps=20))
    assert fast_decoder(model, product_kernel=False).kernel_products == 0
    assert fast_decoder(model, packed=False).kernel_products == 0  # one copy of the weights: no panels
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()  # the forward reads the stacked copy
