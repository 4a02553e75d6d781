"""Per-row token selection."""

import torch

from deployments.engines.records import SamplingParams
from deployments.engines.sampling import apply_penalties, filter_top_k_top_p, make_generator, select_tokens


class Row:
    def __init__(self, params, seed=None, output_ids=()):
        self.params = params
        self.generator = None if params.greedy else make_generator(seed, 0)
        self.output_ids = list(output_ids)


def test_top_k_and_top_p_masks():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [False, False, True, True]
    probs = torch.softmax(logits, -1)  # ~[.64, .24, .09, .03]
    kept = ~torch.isinf(filter_top_k_top_p(logits, 0, 0.8))
    assert kept.tolist() == [True, True, False, False] and probs[0] < 0.8


def test_penalties_follow_openai_definition():
    logits = torch.zeros(5)
    params = SamplingParams(max_new_tokens=1, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, params, [1, 1, 3])
    assert out.tolist() == [0.0, -1.0, 0.0, -0.75, 0.0]


def test_greedy_rows_take_argmax_and_seeded_rows_repeat():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy = Row(SamplingParams(max_new_tokens=1, temperature=0.0))
    sampled = SamplingParams(max_new_tokens=1, temperature=1.0, seed=5)
    first, failed, _ = select_tokens(logits, [greedy, Row(sampled, 5), Row(sampled, 5)])
    assert not failed
    assert first[0] == int(torch.argmax(logits[0]))
    again, _, _ = select_tokens(logits[[2, 1, 0]], [Row(sampled, 5), Row(sampled, 5), greedy])
    assert again[1] == first[1]  # same row content + same seed -> same draw, wherever it sits


def test_extreme_settings_degrade_or_fail_one_row_only():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    tiny_temperature = Row(SamplingParams(max_new_tokens=1, temperature=1e-40))
    tiny_top_p = Row(SamplingParams(max_new_tokens=1, temperature=1.0, top_p=1e-46), seed=1)
    assert tiny_temperature.params.greedy  # treated as argmax instead of overflowing
    broken = Row(SamplingParams(max_new_tokens=1, temperature=1.0), seed=2)
    broken.generator = "not a generator"  # sampling this row raises
    tokens, failed, _ = select_tokens(logits, [tiny_temperature, tiny_top_p, broken])
    assert tokens[0] == int(torch.argmax(logits[0])) and tokens[1] == int(torch.argmax(logits[1]))
    assert list(failed) == [2]


def test_logit_bias_applies_to_its_row_only_greedy_included():
    from deployments.engines.sampling import apply_logit_bias

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    assert apply_logit_bias(torch.zeros(4), ((1, 2.5), (3, -1.0))).tolist() == [0.0, 2.5, 0.0, -1.0]
    plain = Row(SamplingParams(max_new_tokens=1, temperature=0.0))
    forced = Row(SamplingParams(max_new_tokens=1, temperature=0.0, logit_bias=((7, 100.0),)))
    sampled = SamplingParams(max_new_tokens=1, temperature=1.0, seed=5)
    base, _, _ = select_tokens(logits, [plain, plain, Row(sampled, 5)])
    tokens, failed, _ = select_tokens(logits, [plain, forced, Row(sampled, 5)])
    assert not failed and tokens[1] == 7
    assert tokens[0] == base[0] and tokens[2] == base[2]  # the neighbours chose as before


def test_min_p_keeps_tokens_near_the_likeliest():
    from deployments.engines.sampling import filter_min_p

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = ~torch.isinf(filter_min_p(logits, 0.5))  # threshold 0.25
    assert kept.tolist() == [True, True, False, False]
    assert torch.equal(filter_min_p(logits, 0.0), logits)


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, 10)
    logits[0, 9] = 5.0  # EOS is the likeliest
    params = SamplingParams(max_new_tokens=8, temperature=0.0, min_tokens=2, stop_token_ids=(8,))
    logits[0, 8] = 4.0  # then the stop token
    early = Row(params, output_ids=[1])
    tokens, _, _ = select_tokens(logits, [early], eos_token_ids=(9,))
    assert tokens[0] not in (8, 9)
    tokens, _, _ = select_tokens(logits, [Row(params, output_ids=[1, 2])], eos_token_ids=(9,))
    assert tokens == [9]
