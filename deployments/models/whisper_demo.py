"""The built-in demo Whisper checkpoint: built offline and deterministically, like the demo chat model.

:class:`WhisperDemo` writes an ordinary Hugging Face Whisper checkpoint (``WhisperForConditionalGeneration``
weights, a ``WhisperTokenizer``, a ``WhisperFeatureExtractor`` — together a ``WhisperProcessor`` — and a
generation config with ``lang_to_id``, ``task_to_id``, ``no_timestamps_token_id`` ...) so the server and
the ``transformers`` ASR pipeline load it exactly like openai/whisper-tiny.

Token layout, because Whisper's code derives ids from positions rather than looking them up:

- ids ``0 .. V-1``: a byte-level BPE vocabulary trained locally on the demo corpus (no special tokens, so
  ``<|endoftext|>`` is the lowest special id: ``get_prompt_ids`` treats every id >= it as special);
- ``<|endoftext|>``, ``<|startoftranscript|>``, then the 100 language tokens in ``LANGUAGES`` order (the
  tokenizer computes a language id as ``sot + 1 + index``), ``<|translate|>``, ``<|transcribe|>``,
  ``<|startoflm|>``, ``<|startofprev|>``, ``<|nocaptions|>``, ``<|notimestamps|>`` — the LAST special token
  (the tokenizer takes ``all_special_ids[-1] + 1`` as the first timestamp id);
- the 1501 timestamps ``<|0.00|>`` ... ``<|30.00|>`` as plain added tokens (generation takes
  ``no_timestamps_token_id + 1`` as ``<|0.00|>``).

A random-init model never predicts ``<|endoftext|>`` on purpose, so the generation config caps each 30 s
window at ``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPECIALS_AFTER_LANGUAGES = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                            "<|nocaptions|>", "<|notimestamps|>"]
N_TIMESTAMPS = 1501  # 0.00 .. 30.00 s in steps of 0.02 s


def whisper_special_tokens() -> list[str]:
    """``<|startoftranscript|>``, the language tokens in ``LANGUAGES`` order, then the task/control tokens."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return ["<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES), *SPECIALS_AFTER_LANGUAGES]


def timestamp_tokens() -> list[str]:
    return [f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)]


def build_whisper_tokenizer(vocab_size: int):
    """A WhisperTokenizer over a locally trained byte-level BPE, with Whisper's special-token layout."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, WhisperTokenizer

    from deployments.models.corpus import corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = WhisperTokenizer(vocab=model["vocab"], merges=merges, model_max_length=448)
    # <|endoftext|> first (bos = eos = unk = pad), then the rest in order, <|notimestamps|> last.
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for t in ["<|endoftext|>", *whisper_special_tokens()]]})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in timestamp_tokens()])
    tok.pad_token = "<|endoftext|>"
    tok.set_prefix_tokens()
    return tok


@dataclass(frozen=True)
class WhisperDemo:
    """A small random-init multilingual Whisper (80 mel bins, 30 s windows) with the demo tokenizer."""

    d_model: int = 64
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 128
    vocab_size: int = 1000
    max_new_tokens: int = 24  # per 30 s window: a random model would otherwise run to max_target_positions
    # Wide init (as for the demo chat model): peaked logits make greedy decoding, and so batched ==
    # unbatched comparisons, independent of float rounding between near-ties.
    init_std: float = 0.2
    seed: int = 0

    def build(self, out: Path) -> None:
        import torch
        from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                                  WhisperForConditionalGeneration, WhisperProcessor)
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        tokenizer = build_whisper_tokenizer(self.vocab_size)
        ids = {t: tokenizer.convert_tokens_to_ids(t)
               for t in ["<|endoftext|>", *whisper_special_tokens()]}
        eot, sot, notimestamps = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]
        assert tokenizer.all_special_ids[-1] == notimestamps and len(tokenizer) == notimestamps + 1 + N_TIMESTAMPS
        space = tokenizer.convert_tokens_to_ids("Ġ")
        # A trained Whisper learns never to emit control tokens mid-text; a random one must be told.
        suppress = [i for t, i in ids.items() if t != "<|endoftext|>"]
        config = WhisperConfig(
            vocab_size=len(tokenizer), num_mel_bins=80, d_model=self.d_model,
            encoder_layers=self.layers, decoder_layers=self.layers, encoder_attention_heads=self.heads,
            decoder_attention_heads=self.heads, encoder_ffn_dim=self.ffn_dim, decoder_ffn_dim=self.ffn_dim,
            max_source_positions=1500, max_target_positions=448, init_std=self.init_std,
            pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot,
            begin_suppress_tokens=[space, eot], suppress_tokens=suppress, dtype="float32",
        )
        torch.manual_seed(self.seed)
        model = WhisperForConditionalGeneration(config).eval()
        model.generation_config = GenerationConfig(
            decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
            max_length=448, max_new_tokens=self.max_new_tokens, begin_suppress_tokens=[space, eot],
            suppress_tokens=suppress, num_beams=1, is_multilingual=True, no_timestamps_token_id=notimestamps,
            prev_sot_token_id=ids["<|startofprev|>"], max_initial_timestamp_index=50,
            lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES},
            task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
            # Cross-attention heads used for word-level timestamps (any heads will do for a random model).
            alignment_heads=[[self.layers - 1, h] for h in range(self.heads)],
            forced_decoder_ids=None, return_timestamps=False,
        )
        model.save_pretrained(out)
        processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80),
                                     tokenizer=tokenizer)
        processor.save_pretrained(out)


WHISPER_DEMO = WhisperDemo()
