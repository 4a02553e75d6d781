"""TextStream: incremental text with stop strings held back and never emitted."""

from deployments.engines.detokenize import TextStream


class CharTokenizer:
    """One token per character (ids are code points); 0xFFFD-producing ids model partial UTF-8."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def feed(stream, text):
    out = [stream.push(ord(c)) for c in text]
    return out, "".join(out) + stream.finish()


def test_plain_text_streams_through():
    pieces, text = feed(TextStream(CharTokenizer()), "hello")
    assert pieces == list("hello") and text == "hello"


def test_stop_string_across_tokens_is_cut_and_held_back():
    stream = TextStream(CharTokenizer(), stop=("END",))
    pieces, text = feed(stream, "abcENDxyz")
    assert text == "abc" and stream.stopped
    assert "".join(pieces).find("E") == -1


def test_false_stop_prefix_is_released_later():
    stream = TextStream(CharTokenizer(), stop=("ENDX",))
    pieces, text = feed(stream, "abENDy")
    assert text == "abENDy" and not stream.stopped
    assert pieces[2:5] == ["", "", ""]  # "END" held while it could still become "ENDX"


def test_partial_character_waits_for_completion():
    class Utf8Tokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Utf8Tokenizer())
    euro = "€".encode()
    assert [stream.push(b) for b in euro] == ["", "", "€"]


def test_real_tokenizer_round_trip():
    from deployments.models.demo import demo_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_path("chat"))
    text = "Hello! How are you today? 1 2 3 def add(a, b): ünïcode ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, prompt_ids=tok("hi")["input_ids"])
    assert "".join(stream.push(i) for i in ids) + stream.finish() == text
