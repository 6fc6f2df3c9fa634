#!/usr/bin/env bash
# Run the whole test suite (installs what it needs into .venv first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
py="$(bash tools/ensure_env.sh test)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# two test workers on two cores: one math thread each, or OpenMP threads fight and every step crawls
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec "$py" -m pytest -n 2 -q --durations=25 "$@"
