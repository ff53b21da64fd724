#!/usr/bin/env bash
# One-step setup on a fresh machine: the offline corpora (Debian packages),
# PyTorch (only if none is installed), the build tools, and `some` itself with
# its training and test extras, built against the installed torch.
#
#   bash scripts/setup.sh            # editable install (what the tests use)
#   SOME_CUDA=0 bash scripts/setup.sh  # force a CPU-only build
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}

if [ -x scripts/install_corpus.sh ] || [ -f scripts/install_corpus.sh ]; then
  bash scripts/install_corpus.sh
fi

# torch: keep the one that is installed (a CUDA build on a GPU machine);
# otherwise take the CPU build 2.13.0.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake
"$PY" -m pip install -q --no-build-isolation -e ".[train,test]"
"$PY" -c "import some; print('some', some.__version__, some.build_info())"
