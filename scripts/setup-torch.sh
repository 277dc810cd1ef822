#!/usr/bin/env bash
# Installs PyTorch 2.11.0 (CPU wheel from PyPI) into a virtualenv outside the work tree and prints
# the environment the build needs. `tch` 0.24 is built against libtorch 2.11.0; any other version
# fails at link or run time, so the version is pinned here and checked on every call.
#
# Idempotent: when the venv already holds torch 2.11.0 it only prints the exports.
#   RLHF_TORCH_VENV  where the venv lives (default: ~/.cache/rlhf-coord/torch-venv)
#   RLHF_TORCH_INDEX optional extra index (e.g. the CPU-only wheel index) for pip
# Usage: eval "$(scripts/setup-torch.sh [--test-deps])"
#   --test-deps  also install scripts/requirements-test.txt (transformers etc., the test references)
set -euo pipefail
TORCH_VERSION=2.11.0
VENV=${RLHF_TORCH_VENV:-$HOME/.cache/rlhf-coord/torch-venv}
PY=${PYTHON:-python3}

have_torch() {
  [ -x "$VENV/bin/python" ] &&
    [ "$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" = "$TORCH_VERSION" ]
}

if ! have_torch; then
  echo "setup-torch: installing torch==$TORCH_VERSION into $VENV (about 2 minutes, 4.6 GB)" >&2
  mkdir -p "$(dirname "$VENV")"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  extra=()
  [ -n "${RLHF_TORCH_INDEX:-}" ] && extra=(--extra-index-url "$RLHF_TORCH_INDEX")
  "$VENV/bin/python" -m pip install -q "${extra[@]}" "torch==$TORCH_VERSION" >&2
  have_torch || { echo "setup-torch: torch $TORCH_VERSION not importable from $VENV/bin/python" >&2; exit 1; }
fi

if [ "${1:-}" = "--test-deps" ]; then
  req="$(cd "$(dirname "$0")" && pwd)/requirements-test.txt"
  stamp="$VENV/.rlhf-test-deps.sha256"
  want=$(sha256sum "$req" | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup-torch: installing test dependencies from $req" >&2
    "$VENV/bin/python" -m pip install -q -r "$req" >&2
    echo "$want" >"$stamp"
  fi
fi

TORCH_LIB=$("$VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)
echo "export RLHF_TORCH_VENV='$VENV'"
echo "export LIBTORCH_USE_PYTORCH=1"
echo "export PATH='$VENV/bin':\"\$PATH\""
echo "export RLHF_TORCH_LIB='$TORCH_LIB'"
