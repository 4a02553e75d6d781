"""Image input: streaming chat with one image per request beside the same prompts without one, on one server.

    python -m bench.vision                    # bench/vision.yaml: about 10 minutes (bench/README.md)
    python -m bench.vision --models demo:vlm --levels 8 --requests-per-level 8 --rounds-per-client 1 \
        --out-dir /tmp/vision-smoke           # a check that it works: about 2 minutes

For each model of the config (``models``), each contender is started once per round, warmed up, and driven
by the harness (``bench.run.run_contender``: closed-loop streaming clients, CPU per process role, the model
process's peak RSS) through two "mixes" at every level: ``image`` = the prompt with one
``image_size`` x ``image_size`` JPEG before its text, ``text`` = the same prompt alone (both mixes are the
same prompt spec). The two kinds alternate which goes first, level by level.

Images: every request a started contender receives carries an image it has not seen before: a pool of
distinct JPEGs (shapes and noise on a gradient, drawn from the image's number, ~36 KB; 49 KB as base64), as many as the
contender's start sends, handed out in order as requests are sent (``data:`` URLs, as the openai SDK sends
a local image). So nothing can be cached by image bytes, and the pairing of image to prompt does not
matter: every image has the same size, hence the same number of image tokens.

Every request is greedy with a fixed ``max_tokens`` and ignores EOS: ours takes ``ignore_eos``;
``transformers serve`` refuses fields it does not know (422), so it gets ``generation_config``
``{"min_new_tokens": max_tokens}``, the same effect; the engine alone gets ``ignore_eos`` on its records.

Writes ``<out-dir>/<stem>.md`` and ``.json``; TTFT p90 is computed here from the pooled records (the
harness's summary has p50 and p99).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime
import functools
import io
import json
import random
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import yaml
from pydantic import Field

from bench.config import RESULTS_DIR, BenchConfig
from bench.contenders import CONTENDERS, Contender, RunContext, _ours, _transformers_serve
from bench.load import HttpDriver
from bench.prompts import make_prompts
from bench.run import _entry, machine_info, run_contender

VISION_CONFIG = Path(__file__).with_name("vision.yaml")
KINDS = ("image", "text")  # the two mixes; "image" first: warm-up requests (the first mix's) carry images
SLOT = "bench:image"  # placeholder URL in the image prompts, replaced by the next pool image as a request is sent


class VisionConfig(BenchConfig):
    """The chat bench's config (bench/config.py) plus the models to measure in turn and the image size;
    ``mixes`` must be ``image`` and ``text`` with the same prompt spec (load_vision_config checks)."""

    models: list[str] = Field(default=["demo:vlm"], min_length=1, description=(
        "Model sources measured one after another (`model` is set to each)."))
    image_size: int = Field(448, ge=16, description="Width and height of every request's image, pixels.")

    def plan(self, key: str) -> list[tuple[str, int]]:
        """As the harness's, but by level first, the two kinds alternating which goes first."""
        pairs = super().plan(key)
        levels = list(dict.fromkeys(c for _, c in pairs))
        out = []
        for i, level in enumerate(levels):
            kinds = [m for m, c in pairs if c == level]
            out += [(m, level) for m in (kinds if i % 2 == 0 else kinds[::-1])]
        return out

    def images_per_start(self, key: str) -> int:
        return self.warmup_requests + 1 + sum(self.requests_at(c) for m, c in self.plan(key) if m == "image")


@functools.lru_cache(maxsize=4)
def image_pool(count: int, size: int) -> tuple[str, ...]:
    """``count`` distinct ``size`` x ``size`` JPEGs as data URLs; image ``i`` is always the same picture."""
    from PIL import Image, ImageDraw

    noise = Image.effect_noise((size, size), 40).convert("RGB")
    urls = []
    for i in range(count):
        rng = random.Random(i)
        picture = Image.blend(Image.linear_gradient("L").resize((size, size)).convert("RGB"),
                              Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3))), 0.6)
        draw = ImageDraw.Draw(picture)
        for _ in range(12):
            x, y = rng.randrange(size), rng.randrange(size)
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)],
                  fill=tuple(rng.randrange(256) for _ in range(3)))
        picture = Image.blend(picture, noise, 0.12)  # some texture: JPEG sizes of a photo, not of flat shapes
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=85)
        urls.append("data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode())
    return tuple(urls)


def with_slot(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The prompt with an image slot before the last user message's text."""
    *head, last = messages
    return [*head, {**last, "content": [{"type": "image_url", "image_url": {"url": SLOT}},
                                        {"type": "text", "text": last["content"]}]}]


def filled(messages: list[dict[str, Any]], images: Iterator[str]) -> list[dict[str, Any]]:
    """``messages`` with each image slot replaced by the next image (text prompts come back unchanged)."""
    def part(p: dict[str, Any]) -> dict[str, Any]:
        return {**p, "image_url": {"url": next(images)}} if p.get("image_url", {}).get("url") == SLOT else p

    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m["content"], list) else m
            for m in messages]


def without_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An image prompt (:func:`with_slot`) as the text prompt it was made from."""
    return [{**m, "content": "".join(p.get("text", "") for p in m["content"])} if isinstance(m["content"], list)
            else m for m in messages]


# (model source, contender key) -> prompt tokens of one request, (image, text), as the server's usage counts
# them: the check that images reach the model, and what they cost in tokens.
PROMPT_TOKENS: dict[tuple[str, str], tuple[int | None, int | None]] = {}


class ImageHttpDriver(HttpDriver):
    """A server's chat endpoint; image slots filled as requests are sent, EOS ignored (see the docstring)."""

    def __init__(self, driver: HttpDriver, images: Iterator[str], tf_serve: bool, tag: tuple[str, str]) -> None:
        super().__init__(driver.base_url, driver.model, driver.timeout_s, driver.server_pid)
        self.images, self.tf_serve, self.tag = images, tf_serve, tag

    async def warmup(self, prompts: list[list[dict[str, Any]]], max_tokens: int) -> None:
        """The harness's warm-up, then one unstreamed request of each kind for :data:`PROMPT_TOKENS`."""
        await super().warmup(prompts, max_tokens)
        if prompts:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                counts = []
                for messages in (prompts[-1], without_images(prompts[-1])):
                    body = {**self.body(messages, 1), "stream": False}
                    del body["stream_options"]
                    response = await client.post(f"{self.base_url}{self.route}", json=body)
                    ok = response.status_code == 200
                    counts.append(response.json()["usage"]["prompt_tokens"] if ok else None)
            PROMPT_TOKENS[self.tag] = (counts[0], counts[1])

    def body(self, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
        body = super().body(filled(messages, self.images), max_tokens)
        if self.tf_serve:
            body["generation_config"] = json.dumps({"min_new_tokens": max_tokens})
        else:
            body["ignore_eos"] = True
        return body


def _server(key: str, start: Any, tf_serve: bool = False) -> Any:
    """A harness server contender (bench.contenders) whose driver sends images and ignores EOS."""
    @contextlib.contextmanager
    def wrapped(config: VisionConfig, ctx: RunContext) -> Iterator[ImageHttpDriver]:
        images = iter(image_pool(config.images_per_start(key), config.image_size))
        with start(config, ctx) as driver:
            yield ImageHttpDriver(driver, images, tf_serve, (config.model, key))

    return wrapped


@contextlib.contextmanager
def _engine(config: VisionConfig, ctx: RunContext) -> Iterator[Any]:
    """The engine alone (bench/engine_direct.py), image slots filled, ``ignore_eos`` set on every record.
    Its requests are prepared (image decoded, processor run) on the bench's event loop, as its text ones."""
    from bench.config import model_dir
    from bench.engine_direct import EngineDriver

    images = iter(image_pool(config.images_per_start("vision-engine"), config.image_size))

    class ImageEngineDriver(EngineDriver):
        async def one(self, index: int, messages: list, max_tokens: int) -> Any:
            return await super().one(index, filled(messages, images), max_tokens)

    ours = config.ours
    driver = ImageEngineDriver(model_dir(config.model), threads=2, prefill_threads=ours.prefill_threads,
                               batching=ours.batching.model_dump())
    submit = driver.engine.submit

    def submit_ignoring_eos(requests: list) -> Any:
        for r in requests:
            r.params = dataclasses.replace(r.params, ignore_eos=True)
        return submit(requests)

    driver.engine.submit = submit_ignoring_eos
    try:
        yield driver
    finally:
        driver.close()


# Registered beside the chat bench's contenders, so that bench.run's run_contender and _entry take them.
VISION_CONTENDERS = [
    Contender("vision-ours", "(a) ours", "this server (the README's `serve run` path), batching and threads "
              "as the chat bench's (a)", _server("vision-ours", _ours("batching"))),
    Contender("vision-tf-serve-cb", "(c) transformers serve --cb", "`transformers serve --continuous-batching` "
              "(for a vision-language model it falls back to one request at a time: see the notes)",
              _server("vision-tf-serve-cb", _transformers_serve(True), tf_serve=True)),
    Contender("vision-engine", "(f) engine alone", "our GenerationEngine in-process on 2 threads: no Ray, no "
              "HTTP; requests prepared on the bench's event loop", _engine),
]
CONTENDERS.update({c.key: c for c in VISION_CONTENDERS})
VISION_KEYS = [c.key for c in VISION_CONTENDERS]


def load_vision_config(path: Path | str = VISION_CONFIG, **overrides: Any) -> VisionConfig:
    data = yaml.safe_load(Path(path).read_text()) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = VisionConfig.model_validate(data)
    if set(config.mixes) != set(KINDS) or config.mixes["image"] != config.mixes["text"]:
        raise SystemExit(f"vision config: mixes must be {KINDS}, with the same prompt spec")
    return config


def _p90(runs: list[dict[str, Any]], mix: str, level: int) -> float | None:
    ttfts = [r.ttft for run in runs for r in run["runs"].get((mix, level), ([],))[0]
             if r.error is None and r.ttft is not None]
    return float(np.percentile(ttfts, 90)) if ttfts else None


async def run_vision(config: VisionConfig, out_dir: Path, command: str, stem: str, log=print) -> dict[str, Any]:
    unknown = [k for k in config.contenders if k not in VISION_KEYS]
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; known: {', '.join(VISION_KEYS)}")
    results: dict[str, Any] = {"command": command, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                               "machine": machine_info(config.model_copy(update={"model": config.models[0]})),
                               "config": config.model_dump(), "models": {}}
    most = max(config.requests_at(level) for level in config.levels)
    for model in config.models:
        cfg = config.model_copy(update={"model": model})
        text = make_prompts(most, cfg.mixes["text"])
        prompt_sets = {"image": [with_slot(m) for m in text], "text": text}
        ctx = RunContext(log_dir=out_dir / "logs" / f"vision-{model.replace(':', '-')}")
        collected: dict[str, list[dict[str, Any]]] = {key: [] for key in cfg.contenders}
        for round_ in range(cfg.rounds):
            for key in cfg.contenders if round_ % 2 == 0 else cfg.contenders[::-1]:
                log(f"== {model}, round {round_ + 1}/{cfg.rounds}: {key}")
                collected[key].append(await run_contender(key, cfg, prompt_sets, ctx, set(), log))
                entries = {}
                for k, runs in collected.items():
                    entries[k] = entry = _entry(k, cfg, runs)
                    entry["prompt_tokens"] = PROMPT_TOKENS.get((model, k))
                    for mix, levels in entry["mixes"].items():
                        for figures in levels:
                            figures["ttft_p90"] = _p90(runs, mix, figures["concurrency"])
                    sequential = ctx.log_dir / "tf-serve-cb.log"
                    if k == "vision-tf-serve-cb" and sequential.exists() and \
                            "Falling back to sequential generation" in sequential.read_text(errors="replace"):
                        entry["note"] = ("its log says: \"Only LLMs support continuous batching. Falling back "
                                         "to sequential generation.\"")
                results["models"][model] = entries
                write(results, out_dir, stem)
    return results


def _fig(entry: dict[str, Any], mix: str, level: int) -> dict[str, Any]:
    return next((f for f in entry["mixes"].get(mix, []) if f["concurrency"] == level), {})


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1e3:,.0f}"


def _per_request(figures: dict[str, Any]) -> dict[str, float]:
    """CPU ms per request by process role (from the harness's CPU ms per output token)."""
    ok = figures.get("requests", 0) - figures.get("errors", 0)
    per_token = figures.get("cpu_ms_per_token") or {}
    return {role: ms * figures["output_tokens"] / ok for role, ms in per_token.items()} if ok else {}


def markdown(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    lines = ["# Image input beside text: streaming chat, one server", "",
             f"Command: `{results['command']}`  ",
             f"Machine: {m['cpu']} ({m['cpus']} CPUs, no GPU); torch {m['torch']}, transformers "
             f"{m['transformers']}, Ray {m['ray']}; {results['started']}; server code {m.get('code')}  ",
             f"Requests: `text` = prompts of {cfg['mixes']['text']['buckets']} (share, min words, max words), "
             f"`image` = the same with one {cfg['image_size']}x{cfg['image_size']} JPEG before the text (a new "
             "image for every request); "
             f"max_tokens {cfg['max_tokens']}, greedy, EOS ignored; requests per level = max("
             f"{cfg['requests_per_level']}, {cfg['rounds_per_client']} x clients), {cfg['rounds']} round(s) pooled, "
             f"at most {cfg['max_level_seconds']:.0f} s of issuing per level.", ""]
    notes = []
    for model, entries in results["models"].items():
        counts = [f"{e['label']} {e['prompt_tokens'][0]} / {e['prompt_tokens'][1]}"
                  for e in entries.values() if e.get("prompt_tokens")]
        lines += [f"## `{model}`", "",
                  *([f"Prompt tokens of one request, image / text (the server's `usage`): {'; '.join(counts)}.", ""]
                    if counts else []),
                  "| contender | clients | image tok/s | text tok/s | image / text | TTFT p50 ms, image / text "
                  "| TTFT p90 ms, image / text | E2E p50 s, image / text | errors, image / text |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for entry in entries.values():
            if entry["status"] != "ok":
                lines.append(f"| {entry['label']} | – | **did not run** (see notes) |" + " – |" * 6)
            for level in cfg["levels"]:
                img, txt = _fig(entry, "image", level), _fig(entry, "text", level)
                if not img and not txt:
                    continue
                ti, tt = img.get("tokens_per_s"), txt.get("tokens_per_s")
                ratio = f"{ti / tt:.2f}" if ti and tt else "–"
                e2e = " / ".join("–" if f.get("e2e_p50") is None else f"{f['e2e_p50']:.2f}" for f in (img, txt))
                lines.append(
                    f"| {entry['label']} | {level} | {ti or 0:,.0f} | {tt or 0:,.0f} | {ratio} "
                    f"| {_ms(img.get('ttft_p50'))} / {_ms(txt.get('ttft_p50'))} "
                    f"| {_ms(img.get('ttft_p90'))} / {_ms(txt.get('ttft_p90'))} | {e2e} "
                    f"| {img.get('errors', '–')} / {txt.get('errors', '–')} |")
            notes += [f"- `{model}`, {entry['label']}: {entry['note']}"] if entry.get("note") else []
            if entry.get("error"):
                error = entry["error"].strip().splitlines()  # the harness's message, then its log's tail
                tail = "\n".join(error[:1] + ["..."] + error[-5:] if len(error) > 7 else error)
                notes.append(f"- `{model}`, {entry['label']} failed:\n\n```\n{tail}\n```")
            notes += [f"- `{model}`, {entry['label']}, {mix} at {f['concurrency']} clients: {f['errors']} errors, "
                      f"first: `{f['first_error']}`" for mix, fs in entry["mixes"].items() for f in fs if f["errors"]]
        ours = entries.get("vision-ours")
        if ours and ours["mixes"]:
            roles = sorted({r for fs in ours["mixes"].values() for f in fs for r in _per_request(f)})
            lines += ["", f"CPU ms per request by process, ours, image / text ({', '.join(roles)}):", "",
                      "| clients | " + " | ".join(roles) + " |", "|---:|" + "---:|" * len(roles)]
            for level in cfg["levels"]:
                cpu = [_per_request(_fig(ours, k, level)) for k in KINDS]
                lines.append(f"| {level} | " + " | ".join(" / ".join(f"{c.get(r, 0):.0f}" for c in cpu)
                                                          for r in roles) + " |")
        lines.append("")
    if notes:
        lines += ["## Notes", "", *notes, ""]
    lines += ["Tokens/s: output tokens (from `usage`) of all requests ÷ the level's wall time. TTFT: request sent → "
              "first non-empty content chunk (image upload and preparation included).", ""]
    return "\n".join(lines)


def write(results: dict[str, Any], out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out_dir / f"{stem}.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> int:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    words = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(VISION_CONFIG))
    p.add_argument("--models", type=words, help="comma-separated model sources, e.g. demo:vlm,demo:vlm-smol")
    p.add_argument("--contenders", type=words, help=f"subset of {','.join(VISION_KEYS)}")
    p.add_argument("--levels", type=ints, help="comma-separated client counts, e.g. 1,8,32")
    for name, kind in (("rounds", int), ("requests-per-level", int), ("rounds-per-client", int),
                       ("max-tokens", int), ("max-level-seconds", float), ("warmup-requests", int)):
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--stem", default="vision", help="output file names: <stem>.md/.json")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "out_dir", "stem")}
    config = load_vision_config(args.config, **overrides)
    command = "python -m bench.vision " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    results = asyncio.run(run_vision(config, Path(args.out_dir), command.strip(), args.stem))
    print(json.dumps({model: {k: e["status"] for k, e in entries.items()}
                      for model, entries in results["models"].items()}))
    print(f"wrote {Path(args.out_dir) / args.stem}.md/.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
