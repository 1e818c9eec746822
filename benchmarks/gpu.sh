#!/usr/bin/env bash
# The GPU checks in one prepared run, for a lent GPU machine (CI has none):
#
#     bash benchmarks/gpu.sh OUTDIR          # ~8 minutes on one H200
#
# Runs from the repository root with the machine's own python3 (torch with CUDA, Triton, JAX);
# optional wheels (neural-tangents, TRL) may be carried in .whl/. Each step has its own time
# limit and writes into OUTDIR as it goes, so a step that fails or runs out leaves the others:
#   1. tests/test_cuda.py: the CUDA paths against their CPU twins (Triton gated-AdamW step,
#      eNTK, matrix-free operators)               -> junit.xml
#   2. benchmarks/operators_scale.py --device cuda at N = 10^5, 5*10^5, 10^6
#                                                 -> operators_scale_cuda.json
#   3. benchmarks/optim.py --device cuda (step, train_step vs torch fused AdamW)
#                                                 -> optim-cuda.json
#   4. benchmarks/entk.py --device cuda: the ResNet cases against neural-tangents on the GPU
#                                                 -> entk-cuda.json
#   5. the DPO experiment's gpu preset, cut to one seed and a few epochs (the GPU path end to
#      end, not its result)                       -> dpo-gpu.tgz
# and gpu.log (everything printed).
set -u
OUTDIR=${1:-${OUT:-/tmp/tangentscope-gpu}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
LOG="$OUTDIR/gpu.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ts-site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/ts-site"
fi

step() {   # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    timeout --kill-after=5 "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
torch.cuda.get_device_name()); import triton; print('triton', triton.__version__)"

step tests "${T_TESTS:-100}" $PY -m pytest -q -p no:cacheprovider -W default -rs \
    --junitxml="$OUTDIR/junit.xml" tests/test_cuda.py
step operators "${T_OPERATORS:-170}" $PY benchmarks/operators_scale.py --device cuda \
    --sizes 10000 50000 100000 --channel-sizes 50000 --dense-sizes --no-f64-check \
    --budget 40G --max-seconds 90 --out "$OUTDIR/operators_scale_cuda.json"
step optim "${T_OPTIM:-80}" $PY benchmarks/optim.py --device cuda --only step,train_step
cp benchmarks/results/optim-cuda.json "$OUTDIR/" 2>/dev/null
step entk "${T_ENTK:-100}" $PY benchmarks/entk.py --device cuda --clock wall --cases resnet \
    --sizes 32,128,512 --impls default,jacobian,structured_derivatives --nt-python "$PY" \
    --memory-budget 60G --max-seconds 60 --out "$OUTDIR/entk-cuda.json"
step dpo "${T_DPO:-50}" $PY -m tangentscope.cli run dpo --preset gpu --n_seeds 1 \
    --noise_rates 0.4 --methods dpo+adamw,dpo+gated --sft_steps 100 --epochs 2 --n_evals 1 \
    --workers 2 --no-plot --out /tmp/dpo-gpu
tar czf "$OUTDIR/dpo-gpu.tgz" -C /tmp dpo-gpu 2>/dev/null
echo "=== done"
