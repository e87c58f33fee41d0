#!/usr/bin/env bash
# Creates .venv (Python 3.11) from the lock, requirements.lock (every extra but tpu/cuda, at the
# versions CI runs), installs dense_ssl itself into it (editable, with its console scripts) and
# the Fashion-MNIST files (Debian package dataset-fashion-mnist) used by the evaluation
# benchmark. Safe to run again. Regenerate the lock with `bash .ci/lock` (README: Install).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: install the Debian package dataset-fashion-mnist for the Fashion-MNIST benchmark" >&2
  fi
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.lock
python -m pip install -q --no-deps -e .
