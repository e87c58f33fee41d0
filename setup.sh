#!/usr/bin/env bash
# Creates .venv with the pinned requirements (Python 3.11) and installs the Fashion-MNIST files
# (Debian package dataset-fashion-mnist) used by the evaluation benchmark. Safe to run again.
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
python -m pip install -q -r requirements.txt
