#!/usr/bin/env bash
# Build numabench's wheel and install it into a fresh virtual environment that already holds torch
# (the CPU wheel on this machine's disk), as a user with their own torch would; then check that pip
# left that torch exactly as it was (version, location, RECORD) and that the installed commands run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUILD_PY=${BUILD_PY:-.venv/bin/python}   # any python with setuptools and wheel builds the wheel
TORCH=${TORCH:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}
CONSTRAINTS=${CONSTRAINTS:-constraints.txt}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "wheel-check: building the wheel"
"$BUILD_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp/dist" .
wheel=$(ls "$tmp"/dist/numabench-*.whl)

echo "wheel-check: a fresh venv with $TORCH"
"$PYTHON" -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
# shellcheck disable=SC2086  # TORCH_INDEX is a list of pip options
"$py" -m pip install -q --no-compile $TORCH $TORCH_INDEX -c "$CONSTRAINTS"
torch_state() {
  "$py" - <<'PY'
import hashlib, importlib.metadata as md
d = md.distribution("torch")
record = d.read_text("RECORD") or ""
print(d.version, d.locate_file("torch"), hashlib.sha256(record.encode()).hexdigest())
PY
}
before=$(torch_state)

echo "wheel-check: installing $(basename "$wheel") beside it (${SECONDS}s)"
"$py" -m pip install -q --no-compile "$wheel" -c "$CONSTRAINTS"
after=$(torch_state)
if [ "$before" != "$after" ]; then
  echo "wheel-check: FAILED: installing numabench changed torch" >&2
  echo "  before: $before" >&2
  echo "  after:  $after" >&2
  exit 1
fi
echo "wheel-check: torch untouched ($before) after ${SECONDS}s"

"$tmp/venv/bin/numabench" --version
"$py" -m numabench --version
"$tmp/venv/bin/numabench" topology
echo "wheel-check: ok in ${SECONDS}s"
