#!/usr/bin/env bash
# Creates $VENV if missing and installs encdec into it.
# Never replaces a torch that is already importable: if the base interpreter has torch
# (a cluster's CUDA build, say), the venv sees it through --system-site-packages.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "install: using the importable torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "install: no torch importable; installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
fi
"${PIP[@]}" install -e ".[test]"
"$VENV/bin/python" -c "import torch, deepspeed, webdataset, transformers; print('install: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)" 2>&1 | grep '^install:'
# DeepSpeed JIT-builds its CPU shared-memory collective op at the first process group on a CPU
# machine (a minute, once per install). Build it here, once, so concurrent ranks and tests never
# wait on (or kill) a half-done build; on GPU machines there is nothing to build.
"$VENV/bin/python" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" 2>&1 | grep -i "built\|error" || true
