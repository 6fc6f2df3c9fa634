#!/usr/bin/env bash
# Everything this project proves on a CUDA GPU, in one call (issue 16):
#
#   bash bench/gpu.sh OUTDIR               # on the GPU machine (after bench/gpu_prepare.sh here; carry .whl)
#   bash bench/gpu.sh --cpu-smoke OUTDIR   # the same code paths on the CPU, tiny models, in seconds (a test)
#
# 1. installs the wheels from .whl/ (no network there) into /tmp/site;
# 2. the GPU tests: pytest -m gpu tests/gpu (precision matrix against fp32, fp16 scaler, resume; sdxl_train under
#    FSDP2 and DeepSpeed ZeRO 2 / 3 against the plain run, tests/gpu/test_sharded_gpu.py), log in OUTDIR;
# 3. bench/gpu_bench.py: real-size random SD 1.5 / SDXL LoRA training and gen vs diffusers, into
#    OUTDIR/gpu_bench.md and OUTDIR/gpu_bench.json;
# 4. bench/flux_bench.py: a FLUX.1-dev-size random-weight LoRA step at 1024 px, bf16 / --fp8_base / block swapping
#    (s/step, peak VRAM; targets 24 GiB with fp8, 12 GiB with swapping), into OUTDIR/flux_bench.md.
# Budget on one H100/H200: under 8 minutes wall. The exit code is the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [ "${1:-}" = "--cpu-smoke" ]; then smoke=1; shift; fi
out="${1:?usage: bash bench/gpu.sh [--cpu-smoke] OUTDIR}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
start=$(date +%s)
status=0
# step LOG CMD...: run CMD, its output also in OUTDIR/LOG; the first failing step's code is the exit code
step() {
    local log=$1
    shift
    "$@" 2>&1 | tee "$out/$log"
    local rc=${PIPESTATUS[0]}
    if [ "$status" = 0 ]; then status=$rc; fi
}
if [ "$smoke" = 1 ]; then
    py="${PYTHON:-$(bash tools/ensure_env.sh test)}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    # the GPU tests' code on the CPU, one cheap cell (the whole matrix on the CPU: SDT_GPU_TESTS_ON_CPU=1
    # pytest -m gpu tests/gpu, minutes)
    SDT_GPU_TESTS_ON_CPU=1 step gpu_tests.log "$py" -m pytest -q -m gpu tests/gpu -k sdpa
    step gpu_bench.log "$py" bench/gpu_bench.py --out "$out" --cpu-smoke
    step flux_bench.log "$py" bench/flux_bench.py --out "$out" --cpu-smoke
else
    py=python3
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "gpu.sh: installing .whl/ failed" >&2; exit 3; }
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu.sh: no .whl/ (run bench/gpu_prepare.sh first and carry .whl): using what is installed" >&2
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
    "$py" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$out/gpu.txt"
    step gpu_tests.log "$py" -m pytest -q -m gpu tests/gpu -rs
    step gpu_bench.log "$py" bench/gpu_bench.py --out "$out"
    step flux_bench.log "$py" bench/flux_bench.py --out "$out"
fi
echo "gpu.sh: done in $(( $(date +%s) - start )) s, exit $status; results in $out"
exit "$status"
