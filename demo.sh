#!/usr/bin/env bash
# Run the embedded default job (installs what it needs into .venv first). Extra arguments go to tools/demo.py.
set -euo pipefail
cd "$(dirname "$0")"
py="$(bash tools/ensure_env.sh)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
exec "$py" tools/demo.py "$@"
