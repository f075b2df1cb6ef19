#!/usr/bin/env bash
# Build policyinject's wheel, install it into a fresh virtual environment (torch CPU first, then the wheel
# with the `hf` extra) and, from a folder outside the checkout with no checkout on sys.path, run every CLI
# sub-command's --help, `config schema`, `plugins --json` and `inspect` on presets (scripts/wheel_smoke.py).
#   bash scripts/wheel_check.sh [PYTHON]     (PYTHON builds the wheel; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$PWD
builder="${1:-python3}"
work=$(mktemp -d "${TMPDIR:-/tmp}/policyinject-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)

# Build from a copy of the tracked (and untracked, not ignored) files: a stale build/ or egg-info folder in
# the checkout would otherwise leak removed modules into the wheel.
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$work/src"
"$builder" -m pip wheel -q --no-deps -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/policyinject-*.whl)
echo "wheel-check: built $(basename "$wheel")"

python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q torch==2.13.0 triton==3.7.1
"$work/venv/bin/python" -m pip install -q "${POLICYINJECT_TRANSFORMERS:-transformers==5.24.0}"
"$work/venv/bin/python" -m pip install -q "${wheel}[hf]"

mkdir "$work/outside"
cp scripts/wheel_smoke.py "$work/outside/"
(cd "$work/outside" && env -u PYTHONPATH HF_HUB_OFFLINE=1 CHECKOUT="$checkout" \
    "$work/venv/bin/python" wheel_smoke.py "$work/venv/bin/policyinject")
echo "wheel-check: passed in $(( $(date +%s) - start )) s"
