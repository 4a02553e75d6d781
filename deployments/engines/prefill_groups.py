"""How the engine splits the sequences admitted at one step into prefill groups (one prefill each).

Each sequence exposes ``request`` (with ``prompt_ids``); a request's ``n`` choices are consecutive
sequences sharing one prompt, and always land in the same group (their prompt is computed once).
"""

from __future__ import annotations

from typing import Any

# Prompts prefilled together are left-padded to the longest; allow at most this much padding overall.
PADDING_SLACK = 1.25

# Most prompt tokens in one packed prefill (more prompts go to further packs; a longer prompt alone):
# packing a group of short prompts saves a pass over the weights per prompt, but its attention is
# computed over the whole pack (block-diagonal mask), which grows with the square of the pack.
PACK_TOKENS = 512


def packs(seqs: list[Any]) -> list[list[Any]]:
    """For the lean prefill (prompts packed without padding): split ``seqs`` into groups of at most
    ``PACK_TOKENS`` distinct prompt tokens (at least one request each), in order."""
    groups: list[list[Any]] = []
    tokens, previous = 0, None
    for seq in seqs:
        if seq.request is not previous:
            length = len(seq.request.prompt_ids)
            if not groups or tokens and tokens + length > PACK_TOKENS:
                groups.append([])
                tokens = 0
            tokens += length
            previous = seq.request
        groups[-1].append(seq)
    return groups


def length_groups(seqs: list[Any]) -> list[list[Any]]:
    """For the transformers forward (prompts left-padded to the longest): split ``seqs`` into groups of
    similar prompt length, so padding stays within ``PADDING_SLACK`` of each group's real prompt tokens."""
    groups: list[list[Any]] = []
    lengths: list[int] = []  # prompt length of each request in the current group
    previous = None
    for seq in sorted(seqs, key=lambda s: (len(s.request.prompt_ids), id(s.request), s.index)):
        length = len(seq.request.prompt_ids)
        if seq.request is not previous:
            if lengths and length * (len(lengths) + 1) > PADDING_SLACK * (sum(lengths) + length):
                lengths = []
            if not lengths:
                groups.append([])
            lengths.append(length)
            previous = seq.request
        groups[-1].append(seq)
    return groups


def by_request(seqs: list[Any]) -> list[list[Any]]:
    """One group per request (its ``n`` choices together), in order: requests whose prefill cannot be
    shared (a prompt with images runs alone through the model's forward)."""
    groups: dict[int, list[Any]] = {}
    for seq in seqs:
        groups.setdefault(id(seq.request), []).append(seq)
    return list(groups.values())
