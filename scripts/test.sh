#!/usr/bin/env bash
# The whole test suite. The Keras tests run once per backend, each in its own process, because
# Keras picks its backend at import time (KERAS_BACKEND).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
status=0
"$PY" -m pytest -q -p no:cacheprovider tests --ignore=tests/keras "$@" || status=1
if [ -d tests/keras ]; then
  for backend in tensorflow torch jax; do
    echo "=== Keras tests, KERAS_BACKEND=$backend ==="
    KERAS_BACKEND=$backend "$PY" -m pytest -q -p no:cacheprovider tests/keras "$@" || status=1
  done
fi
exit $status
