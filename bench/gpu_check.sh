#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): each model stage's img/s with the paper preset's
# architectures at random init in fp16, against the plain-loop and zero-cost ceilings, as one
# table. Needs one NVIDIA GPU; nothing is downloaded. Under 5 minutes on one GPU with 16 cores.
#
# Where Python lacks Beam, open_clip or rembg (the lent GPU machine's image: torch, transformers,
# onnxruntime, no Beam), it installs the wheelhouse (WHEELS, default .whl/, built here by
# `python -m bench.wheelhouse build`) with --no-index --no-deps into a venv that sees the
# image's own packages, and runs there. Extra arguments pass through, e.g.
#   bash bench/gpu_check.sh --stages embed --threads 12
#   bash bench/gpu_check.sh --device cpu --tiny        # try it without a GPU
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
WHEELS="${WHEELS:-$ROOT/.whl}"
if ! "$PY" -c "import apache_beam, open_clip, rembg" >/dev/null 2>&1; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: $PY lacks Beam/open_clip/rembg and $WHEELS holds no wheels (python -m bench.wheelhouse build)" >&2
    exit 2
  fi
  VENV="${VENV:-$(mktemp -d)/venv}"
  "$PY" -m venv --without-pip "$VENV"
  # The venv sees the image's packages: its interpreter's own site-packages, even when that
  # interpreter is itself a venv (--system-site-packages would see only the base Python's).
  SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$PY" -c 'import site, sys; print("\n".join(p for p in site.getsitepackages() + [site.getusersitepackages()]))' \
    > "$SITE/_image_site.pth"
  "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check "$WHEELS"/*.whl
  PY="$VENV/bin/python"
fi
# The checkout is the package `prep` itself: import this checkout (never another installed
# copy) through a folder holding a link to it.
PKG="$(mktemp -d)"
ln -s "$ROOT" "$PKG/prep"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # for `bench`
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -n "${OUT:-}" ]; then JSON=(--json "$OUT/gpu_check.jsonl"); else JSON=(); fi
"$PY" -c "import os, prep; assert os.path.realpath(prep.__path__[0]) == os.path.realpath('$ROOT'), prep.__path__"
"$PY" - <<'PYEOF' >&2
import importlib.metadata as md, platform
names = ["torch", "transformers", "onnxruntime", "onnxruntime-gpu", "numpy", "protobuf", "grpcio", "pyarrow",
         "pillow", "apache-beam", "open-clip-torch", "rembg"]
found = []
for n in names:
    try:
        found.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        pass
print(f"gpu_check: Python {platform.python_version()}; " + ", ".join(found))
PYEOF
exec timeout 600 "$PY" -m bench.gpu_check "${JSON[@]}" "$@"
