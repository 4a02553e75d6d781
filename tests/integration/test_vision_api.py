"""Images in chat, through the ``openai`` SDK against the real local Ray Serve: the pinned demo VLM
(Qwen2-VL family: dynamic resolution, multimodal RoPE) and the on-demand one (SmolVLM family: fixed tiles).

Oracles: the server's greedy answer equals transformers ``generate`` with the checkpoint's own processor
on the same image and prompt; batched == alone (rows with and without images in one batch); streamed ==
not; a remote image (a local HTTP server in the test) and a file URL answer as the same bytes sent inline;
every body validates against the OpenAI spec. Bad images are 400s naming the part.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import threading

import openai
import pytest

from tests.conftest import IMAGE_ROOT, MODELS_ROOT
from tests.openapi_schema import assert_valid

pytestmark = pytest.mark.integration

VLM = "demo-vlm"          # pinned (conftest): Qwen2-VL style
SMOL = "demo-vlm-smol"    # on demand (demo-* allow entry): SmolVLM style
QUESTION = "What is in this image?"


def png(size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (200, 30, 30), stripes: bool = False) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, colour)
    if stripes:
        draw = ImageDraw.Draw(image)
        for x in range(0, size[0], 8):
            draw.rectangle([x, 0, x + 3, size[1]], fill=(20, 20, 220))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


RED, STRIPES = png(), png((96, 64), (240, 240, 240), stripes=True)


def chat(client, messages, model: str = VLM, **kwargs):
    return client.chat.completions.create(model=model, messages=messages, temperature=0,
                                          max_tokens=kwargs.pop("max_tokens", 12), **kwargs)


def answer(client, messages, model: str = VLM, **kwargs) -> str:
    raw = chat(client.with_raw_response, messages, model, **kwargs)
    assert_valid(raw.http_response.json(), "CreateChatCompletionResponse")
    return raw.parse().choices[0].message.content


@pytest.fixture(scope="module")
def generate_oracle():
    """Greedy ``generate`` of transformers on a demo VLM with its processor (the same checkpoint files)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from deployments.models.demo import demo_path
    from deployments.models.processors import load_processor

    loaded = {}

    def run(name: str, messages: list[dict], images: list[bytes], max_new_tokens: int = 12) -> str:
        from PIL import Image

        if name not in loaded:
            path = demo_path(name)
            loaded[name] = (load_processor(path),
                            AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval())
        processor, model = loaded[name]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        inputs = processor(text=[text], images=pictures or None, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return run


@pytest.mark.parametrize("model, demo", [(VLM, "vlm"), (SMOL, "vlm-smol")])
def test_server_equals_generate_with_the_processor(client, generate_oracle, model, demo):
    for image in (RED, STRIPES):
        got = answer(client, [user(QUESTION, image_part(data_url(image)))], model)
        want = generate_oracle(demo, [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                                   {"type": "image"}]}], [image])
        assert got == want, (model, got, want)


def test_a_vlm_checkpoint_directory_is_served_on_demand_unchanged(client):
    """An ordinary checkpoint directory (a copy of the demo's files) under models_root, loaded on demand by
    the multiplexed deployment, answers as the pinned model built from the same files."""
    import shutil

    from deployments.models.demo import demo_path

    target = MODELS_ROOT / "local-vlm-dir"
    if not target.exists():
        shutil.copytree(demo_path("vlm"), target)
    messages = [user(QUESTION, image_part(data_url(STRIPES)))]
    assert answer(client, messages, "local-vlm-dir") == answer(client, messages)


def test_the_image_matters_and_streamed_equals_unstreamed(client):
    red = answer(client, [user(QUESTION, image_part(data_url(RED)))])
    striped = answer(client, [user(QUESTION, image_part(data_url(STRIPES)))])
    assert red != striped  # the model saw the pixels
    stream = chat(client, [user(QUESTION, image_part(data_url(RED)))], stream=True,
                  stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == red
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 10  # the image's tokens count as prompt tokens


def test_two_images_in_any_position_and_an_image_in_history(client, generate_oracle):
    two = [user(image_part(data_url(RED)), "and", image_part(data_url(STRIPES)), "compare them")]
    got = answer(client, two)
    want = generate_oracle("vlm", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                                                {"type": "image"},
                                                                {"type": "text", "text": "compare them"}]}],
                           [RED, STRIPES])
    assert got == want
    history = [user(QUESTION, image_part(data_url(STRIPES))), {"role": "assistant", "content": "stripes"},
               {"role": "user", "content": "What colour are they?"}]
    got = answer(client, history)
    want = generate_oracle("vlm", [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                                {"type": "image"}]},
                                   {"role": "assistant", "content": [{"type": "text", "text": "stripes"}]},
                                   {"role": "user", "content": [{"type": "text", "text": "What colour are they?"}]}],
                           [STRIPES])
    assert got == want


async def test_rows_with_and_without_images_batched_equal_alone(async_client):
    requests = [[user(QUESTION, image_part(data_url(RED)))], [{"role": "user", "content": "Hello there"}],
                [user(image_part(data_url(STRIPES)), "describe")], [{"role": "user", "content": "Tell me a story"}],
                [user("two:", image_part(data_url(RED)), image_part(data_url(STRIPES)))],
                [user(QUESTION, image_part(data_url(png((32, 48), (10, 160, 10)))))]]

    async def one(messages):
        out = await async_client.chat.completions.create(model=VLM, messages=messages, temperature=0,
                                                         max_tokens=16, logprobs=True)
        return [t.token for t in out.choices[0].logprobs.content]

    alone = [await one(m) for m in requests]
    together = await asyncio.gather(*(one(m) for m in requests))
    assert list(together) == alone


def test_n_choices_share_one_image_prefill(client):
    out = chat(client, [user(QUESTION, image_part(data_url(RED)))], n=3)
    assert len({c.message.content for c in out.choices}) == 1  # greedy: the same answer three times
    assert out.choices[0].message.content == answer(client, [user(QUESTION, image_part(data_url(RED)))])


@pytest.fixture(scope="module")
def image_server():
    """A local HTTP server: /red.png, /text (not an image), anything else 404."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body, kind, status = {"/red.png": (RED, "image/png", 200),
                                  "/text": (b"hello", "text/plain", 200)}.get(self.path, (b"", "text/plain", 404))
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_remote_and_a_file_image_answer_as_the_same_bytes_inline(client, image_server):
    inline = answer(client, [user(QUESTION, image_part(data_url(RED)))])
    assert answer(client, [user(QUESTION, image_part(f"{image_server}/red.png"))]) == inline
    (IMAGE_ROOT / "red.png").write_bytes(RED)
    assert answer(client, [user(QUESTION, image_part(f"file://{IMAGE_ROOT / 'red.png'}"))]) == inline


def test_responses_take_input_image(client):
    inline = answer(client, [user(QUESTION, image_part(data_url(RED)))])
    out = client.responses.create(model=VLM, temperature=0, max_output_tokens=12, input=[
        {"role": "user", "content": [{"type": "input_text", "text": QUESTION},
                                     {"type": "input_image", "image_url": data_url(RED)}]}])
    assert out.output_text == inline
    # A bad image is named by its place in `input`, whatever messages the instructions add before it.
    bad = [{"type": "input_text", "text": QUESTION}, {"type": "input_image", "image_url": data_url(b"not an image")}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=VLM, instructions="Answer briefly.", max_output_tokens=4, input=[
            {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "A picture."},
            {"role": "user", "content": bad}])
    error = caught.value.response.json()["error"]
    assert (error["param"], error["code"]) == ("input[2].content[1]", "invalid_image"), error
    assert "input[2].content[1]" in error["message"] and "messages" not in error["message"], error


def refusal(client, messages, model: str = VLM, **kwargs) -> dict:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, messages, model, **kwargs)
    body = caught.value.response.json()
    assert_valid(body, "ErrorResponse")
    return body["error"]


def gif_bomb() -> bytes:
    """A few hundred bytes that declare a 20000 x 20000 image."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (20000, 20000)).save(out, "GIF")
    return out.getvalue()


@pytest.mark.parametrize("url, code", [
    ("data:image/png;base64,@@not base64@@", "invalid_image"),
    (data_url(b"this is not an image at all"), "invalid_image"),
    (data_url(RED[:60]), "invalid_image"),                      # truncated PNG
    (data_url(png((600, 600))), "image_too_large"),              # over the pinned VLM's max_image_pixels
    (data_url(gif_bomb(), "gif"), "image_too_large"),
    ("http://127.0.0.1:9/nothing.png", "image_fetch_failed"),    # nothing listens on the discard port
    ("http://example.invalid/a.png", "image_url_not_allowed"),   # not an allowed host
    ("file:///etc/passwd", "image_url_not_allowed"),             # outside the file root
])
def test_bad_images_are_400s_naming_the_part(client, url, code):
    error = refusal(client, [{"role": "system", "content": "be brief"}, user("look", image_part(url))])
    assert error["param"] == "messages[1].content[1]", error
    assert error["code"] == code, error


def test_refusals_of_the_request_as_a_whole(client, image_server):
    error = refusal(client, [user(QUESTION, image_part(data_url(RED)))], model="demo-chat")
    assert (error["param"], error["code"]) == ("messages[0].content[1]", "images_not_supported")
    error = refusal(client, [user(*[image_part(data_url(RED))] * 5)])  # the pinned VLM takes 4
    assert (error["param"], error["code"]) == ("messages[0].content[4]", "too_many_images")
    error = refusal(client, [user(image_part(f"{image_server}/text"))])
    assert error["code"] == "image_fetch_failed" and "text/plain" in error["message"]
    error = refusal(client, [user(QUESTION, image_part(data_url(png((500, 500)))))], max_tokens=2000)
    assert error["code"] == "context_length_exceeded" and "for 1 image" in error["message"], error
    # The replica is not stalled by any of it.
    assert answer(client, [user(QUESTION, image_part(data_url(RED)))])
