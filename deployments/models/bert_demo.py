"""The built-in demo BERT checkpoints (``demo:fill-mask``): built offline and deterministically, like the
demo chat model.

:class:`BertDemo` writes an ordinary Hugging Face BERT checkpoint: a random-init ``BertForMaskedLM``
(or another BERT head, :data:`HEAD_CLASSES`) under a fixed seed, and an uncased WordPiece tokenizer
trained with ``tokenizers`` on the in-repo corpus (``deployments/models/corpus.py``) with BERT's special
tokens (``[PAD]`` = 0, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``), saved as a ``BertTokenizerFast``
(``tokenizer.json``, ``tokenizer_config.json`` and the classic ``vocab.txt``). So the server, and
``transformers.pipeline("fill-mask", model=path)``, load it exactly like google-bert/bert-base-uncased.
Its predictions are noise, but deterministic noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# The transformers class of each BERT head a demo can carry.
HEAD_CLASSES = {"fill-mask": "BertForMaskedLM"}


def build_wordpiece_tokenizer(vocab_size: int, max_length: int):
    """An uncased BERT WordPiece tokenizer built locally; deterministic for a fixed corpus.

    The pieces are learned by ``tokenizers``' BPE trainer (BERT's lowercasing normalizer and
    pre-tokenizer) and each is in the vocabulary twice: as a word start and, ``##``-prefixed, as a
    continuation. (Its WordPiece trainer, the BPE trainer with ``continuing_subword_prefix``, numbers
    and merges differently from one run to the next; the plain BPE trainer does not.)"""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    from deployments.models.corpus import corpus

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.normalizer = normalizers.BertNormalizer(lowercase=True)
    bpe.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    bpe.train_from_iterator(corpus(), trainer=trainer)
    learned = sorted(bpe.get_vocab().items(), key=lambda item: item[1])
    pieces = [token for token, _ in learned if token not in SPECIAL_TOKENS]
    vocab = [*SPECIAL_TOKENS, *pieces, *(f"##{piece}" for piece in pieces)]
    # BertTokenizerFast adds BERT's normalizer, pre-tokenizer, [CLS] ... [SEP] template and decoder.
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True,
                             model_max_length=max_length)


@dataclass(frozen=True)
class BertDemo:
    """A small random-init BERT with the demo WordPiece tokenizer."""

    head: str = "fill-mask"  # a key of HEAD_CLASSES
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    vocab_size: int = 1000  # the BPE trainer's bound (the corpus yields ~550 pieces, x2 with ## forms)
    max_positions: int = 128  # small, so that a too-long input is cheap to test
    # Wider than BERT's 0.02 (as for the other demos) so that the output distribution is peaked: the
    # top candidates then differ by more than float rounding, and batched == alone compares tokens.
    initializer_range: float = 0.2
    seed: int = 0

    def build(self, out: Path) -> None:
        import torch
        import transformers

        tokenizer = build_wordpiece_tokenizer(self.vocab_size, self.max_positions)
        config = transformers.BertConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_positions, initializer_range=self.initializer_range,
            pad_token_id=tokenizer.pad_token_id, dtype="float32",
        )
        torch.manual_seed(self.seed)
        model = getattr(transformers, HEAD_CLASSES[self.head])(config).eval()
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        # The classic BERT vocabulary file, one token per line in id order (older loaders read it).
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        (out / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")


FILL_MASK_DEMO = BertDemo()
