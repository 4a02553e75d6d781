"""The demo BERT checkpoint, and the pipeline engine against transformers' own fill-mask pipeline."""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import pytest

from app.config import FillMaskModelSpec, PipelineBatchingSpec
from app.errors import ContextLengthExceeded, InvalidRequest
from app.protocol.pipeline import FillMaskParameters
from deployments.models.bert_demo import FILL_MASK_DEMO
from deployments.models.loader import load_pipeline_engine
from deployments.models.sources import resolve_source

SPEC = FillMaskModelSpec(id="m", source="demo:fill-mask", task="fill-mask")
TEXTS = ["Paris is the [MASK] of France.",
         "The quick brown [MASK] jumps over the lazy dog, and a robot counts one, two, three.",
         "Hello [MASK]",
         "a [MASK] b [MASK] c"]  # several masks: a list per mask
SCORE_TOL = 1e-5


@pytest.fixture(scope="module")
def path():
    return resolve_source("demo:fill-mask")


@pytest.fixture(scope="module")
def engine():
    return load_pipeline_engine(SPEC)


@pytest.fixture(scope="module")
def oracle(path):
    from transformers import pipeline

    return pipeline("fill-mask", model=str(path), device="cpu")


def params(**fields) -> FillMaskParameters:
    return FillMaskParameters(**fields)


def run(engine, *requests):
    """Each request (texts, parameters) as a job, all in one forward() call; the values per request."""
    jobs = [engine.prepare(texts, p) for texts, p in requests]
    return [[r.value for r in results] for results in engine.forward(jobs)]


def plain(value):
    return [plain(v) for v in value] if isinstance(value, list) else asdict(value)


def assert_same(got, expected):
    """Same shape, tokens, token strings and sequences; scores within SCORE_TOL."""
    if isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), (got, expected)
        for g, e in zip(got, expected):
            assert_same(g, e)
        return
    got = got if isinstance(got, dict) else asdict(got)
    assert {k: got[k] for k in ("token", "token_str", "sequence")} == \
        {k: expected[k] for k in ("token", "token_str", "sequence")}
    assert got["score"] == pytest.approx(expected["score"], abs=SCORE_TOL)


def test_demo_checkpoint_is_an_ordinary_bert_and_builds_deterministically(path, tmp_path):
    from transformers import AutoConfig, AutoTokenizer, BertTokenizerFast

    tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(tok, BertTokenizerFast) and AutoConfig.from_pretrained(path).model_type == "bert"
    assert [tok.pad_token_id, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token] == \
        [0, "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.tokenize("Paris IS the [MASK]") == ["paris", "is", "the", "[MASK]"]  # lowercase, mask kept
    vocab = (path / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab == sorted(tok.get_vocab(), key=tok.get_vocab().get)
    FILL_MASK_DEMO.build(tmp_path)  # a second build, byte for byte the same
    for name in ("model.safetensors", "tokenizer.json", "vocab.txt", "config.json"):
        assert hashlib.sha256((tmp_path / name).read_bytes()).digest() == \
            hashlib.sha256((path / name).read_bytes()).digest(), name


@pytest.mark.parametrize("fields", [{}, {"top_k": 12}, {"top_k": 1},
                                    {"targets": ["capital", "Paris", "zzzz", "robot", "city"], "top_k": 3},
                                    {"targets": "robot"}], ids=["default", "top12", "top1", "targets", "target"])
def test_engine_equals_the_transformers_pipeline(engine, oracle, fields):
    got = run(engine, (TEXTS, params(**fields)))[0]
    for text, value in zip(TEXTS, got):
        assert_same(value, oracle(text, **fields))


def test_a_list_of_texts_answers_like_the_pipeline_on_the_list(engine, oracle):
    got = run(engine, (TEXTS[:2], params()))[0]
    assert_same(got, oracle(TEXTS[:2]))


def test_batched_equals_alone_and_one_forward_per_group(engine):
    requests = [([TEXTS[0]], params()), (TEXTS[1:3], params(top_k=7)),
                ([TEXTS[3]], params(targets=["one", "two", "three"])), ([TEXTS[2]], params(top_k=1))]
    alone = [run(engine, r)[0] for r in requests]
    before = engine.stats()["forwards"]
    together = run(engine, *requests)
    assert engine.stats()["forwards"] == before + 1  # everything in one padded pass
    for a, t in zip(alone, together):
        assert_same(plain(t), plain(a))


def test_max_batch_tokens_splits_a_group_without_changing_answers(engine):
    requests = [(TEXTS, params()), (TEXTS[::-1], params(top_k=3))]
    whole = run(engine, *requests)
    engine.apply(PipelineBatchingSpec(max_batch_tokens=24))  # the longest text alone is ~20 tokens
    try:
        before = engine.stats()["forwards"]
        split = run(engine, *requests)
        assert engine.stats()["forwards"] - before > 2
    finally:
        engine.apply(PipelineBatchingSpec())
    assert_same(plain(split[0]) + plain(split[1]), plain(whole[0]) + plain(whole[1]))


def test_mask_positions_only_projection_equals_the_full_forward(engine):
    assert engine.narrow_logits  # BERT's decoder can be narrowed to the mask positions
    narrow = run(engine, (TEXTS, params(top_k=20)))
    engine.narrow_logits = False
    try:
        full = run(engine, (TEXTS, params(top_k=20)))
    finally:
        engine.narrow_logits = True
    assert_same(plain(narrow[0]), plain(full[0]))


async def test_submit_answers_each_admitted_group_in_one_forward(engine):
    jobs = [engine.prepare([t], params()) for t in TEXTS]
    before = engine.stats()["forwards"]
    streams = engine.submit(jobs)
    results = [[item async for item in stream] for stream in streams]
    assert engine.stats()["forwards"] == before + 1
    assert [len(r) for r in results] == [1] * len(TEXTS)  # one message per request
    assert [r[0][0].index for r in results] == [0] * len(TEXTS)
    cancelled = engine.prepare([TEXTS[0]], params())
    cancelled.cancelled = True
    kept = engine.prepare([TEXTS[1]], params())
    before = engine.stats()["texts"]
    stream = engine.submit([cancelled, kept])[1]
    assert [r.index for r in (await anext(aiter(stream)))] == [0]
    assert engine.stats()["texts"] == before + 1  # the cancelled job was never computed


def test_a_text_without_the_mask_token_is_refused_naming_it(engine):
    with pytest.raises(InvalidRequest, match=r"No mask token \(\[MASK\]\) found in the input") as exc:
        engine.prepare(["Paris is the capital of France."], params())
    assert exc.value.param == "inputs" and exc.value.status_code == 400
    with pytest.raises(InvalidRequest, match=r"at inputs\[1\]") as exc:
        engine.prepare([TEXTS[0], "no mask here", TEXTS[1]], params())
    assert exc.value.param == "inputs[1]" and exc.value.code == "no_mask_token"
    with pytest.raises(InvalidRequest, match="No mask token"):
        engine.prepare([""], params())


def test_a_text_too_long_is_refused_with_the_counts(engine):
    limit = engine.max_input_tokens
    assert limit == FILL_MASK_DEMO.max_positions
    text = "[MASK] " + "one " * limit
    with pytest.raises(ContextLengthExceeded, match=rf"maximum input length is {limit} tokens, but the input "
                                                    rf"has {limit + 3} tokens"):
        engine.prepare([text], params())
    with pytest.raises(ContextLengthExceeded, match=r"the input at inputs\[1\] has") as exc:
        engine.prepare([TEXTS[0], text], params())
    assert exc.value.param == "inputs[1]"
    ok = "[MASK]" + " one" * (limit - 3)  # [CLS] + mask + words + [SEP] = exactly the limit
    assert len(run(engine, ([ok], params()))[0][0]) == 5


def test_targets_that_are_no_token_at_all_are_refused(engine):
    with pytest.raises(InvalidRequest, match="None of the targets") as exc:
        engine.prepare([TEXTS[0]], params(targets=["", "   "]))
    assert exc.value.param == "parameters.targets"


def test_top_k_is_capped_by_the_targets_and_the_vocabulary(engine):
    assert len(run(engine, ([TEXTS[0]], params(top_k=50, targets=["one", "two"])))[0][0]) == 2
    assert len(run(engine, ([TEXTS[0]], params(top_k=10**6)))[0][0]) == engine.vocab_size


@pytest.mark.parametrize("arch", ["DistilBertForMaskedLM", "RobertaForMaskedLM", "ModernBertForMaskedLM"])
def test_any_masked_lm_checkpoint_directory_loads_through_the_same_path(path, tmp_path, arch):
    """No special-casing of BERT: other masked-LM architectures, saved as ordinary checkpoints with the
    demo tokenizer, load from a directory and answer as the pipeline does (narrowed projection or not)."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    config_class = getattr(transformers, arch.replace("ForMaskedLM", "Config"))
    specials = dict(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, cls_token_id=tok.cls_token_id,
                    sep_token_id=tok.sep_token_id)
    fields = {"DistilBertForMaskedLM": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
              "RobertaForMaskedLM": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64),
              "ModernBertForMaskedLM": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, global_attn_every_n_layers=1, **specials)}[arch]
    config = config_class(vocab_size=len(tok), max_position_embeddings=160, pad_token_id=tok.pad_token_id,
                          initializer_range=0.2, **fields)
    torch.manual_seed(0)
    getattr(transformers, arch)(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = load_pipeline_engine(SPEC.model_copy(update={"source": str(tmp_path)}))
    assert engine.max_input_tokens == 128  # the tokenizer's bound is below the model's 160 positions
    oracle = transformers.pipeline("fill-mask", model=str(tmp_path), device="cpu")
    got = run(engine, (TEXTS, params(top_k=4)))[0]
    for text, value in zip(TEXTS, got):
        assert_same(value, oracle(text, top_k=4))
