#!/usr/bin/env bash
# Create ./.venv with a Python >= 3.12 interpreter (megatron-core 0.19 needs it) and install the
# project with its test and DeepSpeed extras. Idempotent; used by the README's quick start and CI.
#   bash launch/setup_env.sh            # or: PYTHON=/path/to/python3.12 bash launch/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."

is_py312() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  if [ -n "${PYTHON:-}" ]; then
    is_py312 "$PYTHON" && { echo "$PYTHON"; return; }
    echo "PYTHON=$PYTHON is not Python >= 3.12" >&2
    return 1
  fi
  for candidate in python3.14 python3.13 python3.12 python3; do
    command -v "$candidate" >/dev/null 2>&1 && is_py312 "$candidate" && { command -v "$candidate"; return; }
  done
  # pyenv installs versions that its shims only run once selected: look for them directly.
  if command -v pyenv >/dev/null 2>&1; then
    for dir in "$(pyenv root)"/versions/3.1[2-9]*; do
      [ -x "$dir/bin/python" ] && is_py312 "$dir/bin/python" && { echo "$dir/bin/python"; return; }
    done
  fi
  echo "no Python >= 3.12 found: install one, or set PYTHON=/path/to/python3.12" >&2
  return 1
}

if [ ! -x .venv/bin/python ] || ! is_py312 .venv/bin/python; then
  python=$(find_python)
  echo "creating .venv with $python ($("$python" --version 2>&1))"
  rm -rf .venv
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,deepspeed,liger]"
echo "ready: .venv/bin/omnimoe-train, .venv/bin/omnimoe-data, .venv/bin/python -m pytest"
