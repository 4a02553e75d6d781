"""Loading several models at once in threads (as the on-demand pool does) gives each the weights it
would get alone: transformers' from_pretrained is not thread-safe, so the loader serialises that step."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from app.config import ChatModelSpec
from deployments.engines import product_kernel
from deployments.models.loader import load_prepared_chat, prepare_chat

NAMES = ["chat", "chat-s1", "chat-s2", "bench"]


def load(name):
    spec = ChatModelSpec(id=name, source=f"demo:{name}")
    engine, size = load_prepared_chat(spec, prepare_chat(spec)[0])
    return {k: v.clone() for k, v in engine.model.state_dict().items()}, size


def test_parallel_loads_equal_loads_one_at_a_time():
    alone = {name: load(name) for name in NAMES}
    for _ in range(2):
        with ThreadPoolExecutor(len(NAMES)) as pool:
            together = dict(zip(NAMES, pool.map(load, NAMES)))
        for name in NAMES:
            weights, size = together[name]
            assert size == alone[name][1]
            assert weights.keys() == alone[name][0].keys()
            assert all(weights[k].equal(alone[name][0][k]) for k in weights), name


def test_weight_estimate_matches_the_loaded_size():
    for name in ["chat-s2", "bench"]:
        spec = ChatModelSpec(id=name, source=f"demo:{name}")
        path, estimate = prepare_chat(spec)
        _, size = load_prepared_chat(spec, path)
        assert 0.9 * size <= estimate <= 1.1 * size


def test_packed_weights_count_as_a_second_copy():
    """On CPU in float32 the lean forward's packed copy of the weights is memory the pool must count, and
    so are the product kernel's panels (a third copy) where this machine builds the kernel."""
    spec = ChatModelSpec(id="bench", source="demo:bench", product_kernel=False)
    plain = spec.model_copy(update={"packed_weights": False})
    path, packed_estimate = prepare_chat(spec)
    _, plain_estimate = prepare_chat(plain)
    (engine, packed_size), (_, plain_size) = load_prepared_chat(spec, path), load_prepared_chat(plain, path)
    assert engine.fast_decoder.packed
    assert 1.8 * plain_size <= packed_size <= 2 * plain_size
    assert packed_estimate == 2 * plain_estimate
    with_kernel = spec.model_copy(update={"product_kernel": True})
    _, kernel_estimate = prepare_chat(with_kernel)
    _, kernel_size = load_prepared_chat(with_kernel, path)
    copies = 3 if product_kernel.available() else 2
    assert kernel_estimate == copies * plain_estimate
    assert (copies - 0.2) * plain_size <= kernel_size <= copies * 1.01 * plain_size