#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): each model stage's img/s with the paper preset's
# architectures at random init in fp16, against the plain-loop and zero-cost ceilings, as one
# table. Needs one NVIDIA GPU and the project's pip environment; nothing is downloaded.
# Under 5 minutes on one GPU with 16 cores. Extra arguments pass through, e.g.
#   bash bench/gpu_check.sh --stages embed --threads 12
#   bash bench/gpu_check.sh --device cpu --tiny        # try it without a GPU
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
# The checkout is the package `prep` itself: import this checkout (never another installed
# copy) through a folder holding a link to it.
PKG="$(mktemp -d)"
ln -s "$ROOT" "$PKG/prep"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # for `bench`
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -n "${OUT:-}" ]; then JSON=(--json "$OUT/gpu_check.jsonl"); else JSON=(); fi
"$PY" -c "import os, prep; assert os.path.realpath(prep.__path__[0]) == os.path.realpath('$ROOT'), prep.__path__"
exec timeout 600 "$PY" -m bench.gpu_check "${JSON[@]}" "$@"
