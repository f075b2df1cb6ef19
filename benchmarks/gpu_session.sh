#!/usr/bin/env bash
# One GPU session: set up the project on the lent GPU machine, then run the named stages.
#   bash benchmarks/gpu_session.sh env tests kernels quant q4mma sweep decode breakdown normfusion tp
# Outputs (logs, JSON, plots) go to $OUT (or ./out). The cattrs wheel (absent there) travels in .whl/.
set -uo pipefail
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --no-index ./examples/policyinject-example-plugin >>"$OUT/install.log" 2>&1 || true
status=0
for stage in "$@"; do
    echo "=== stage $stage $(date +%T)"
    case "$stage" in
        env)
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
            python3 -c "import torch, triton, transformers, attrs, cattrs; from importlib.metadata import version; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'attrs', attrs.__version__, 'cattrs', version('cattrs'), 'gpus', torch.cuda.device_count())"
            ;;
        tests)
            python3 -m pytest -m gpu -q -p no:cacheprovider --timeout=300 tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 || status=1
            ;;
        alltests)
            python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/all_tests.log" | tail -25 || status=1
            ;;
        kernels)
            python3 benchmarks/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -40 || status=1
            ;;
        quant)
            python3 benchmarks/quant.py --json "$OUT/quant.json" 2>&1 | tee "$OUT/quant.log" | tail -40 || status=1
            ;;
        q4mma)
            python3 benchmarks/q4mma_probe.py 2>&1 | tee "$OUT/q4mma_probe.log" | tail -20 || status=1
            ;;
        sweep)
            python3 benchmarks/gemv_sweep.py --json "$OUT/gemv_sweep.json" 2>&1 | tee "$OUT/gemv_sweep.log" | tail -60 || status=1
            ;;
        decode)
            python3 benchmarks/decode.py --json "$OUT/decode.json" --plot "$OUT/decode.png" 2>&1 | tee "$OUT/decode.log" | tail -40 || status=1
            ;;
        breakdown)
            python3 benchmarks/decode_breakdown.py --preset llama-3.2-1b --json "$OUT/breakdown_1b.json" 2>&1 | tee "$OUT/breakdown.log" | tail -45 || status=1
            python3 benchmarks/decode_breakdown.py --preset llama-3-8b --json "$OUT/breakdown_8b.json" 2>&1 | tee -a "$OUT/breakdown.log" | tail -45 || status=1
            ;;
        normfusion)
            python3 benchmarks/norm_fusion.py --json "$OUT/norm_fusion.json" 2>&1 | tee "$OUT/norm_fusion.log" | tail -30 || status=1
            ;;
        tp)
            n=$(python3 -c "import torch; print(torch.cuda.device_count())")
            torchrun --standalone --nproc-per-node "$n" benchmarks/tensor_parallel.py --tp "$(python3 -c "n=$n; print(','.join(str(t) for t in (1,2,4,8) if t<=n))")" --out "$OUT/tp.json" 2>&1 | tee "$OUT/tp.log" | tail -40 || status=1
            ;;
        *)
            echo "unknown stage $stage"; status=1 ;;
    esac
done
exit $status
