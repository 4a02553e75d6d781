"""Benchmark harness: drives the streaming chat endpoint of several contenders side by side.

``python -m bench.run`` starts each contender in turn (this server with and without batching,
``transformers serve`` with and without continuous batching, a naive single-queue server, and the offline
``model.generate`` ceiling), drives it at fixed concurrency levels with the same prompts, stops it, and
writes ``bench/results/latest.{md,json,png}``.
"""
