#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv, or $SDT_VENV) and print its python.
# torch: kept if the venv already has one (GPU users install their CUDA build first); otherwise the
# CPU wheel torch==2.13.0. Then requirements.txt (+ requirements-test.txt when $1 == test).
# Re-runs are fast: a stamp of the requirement files skips pip when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SDT_VENV:-$root/.venv}"
py="$venv/bin/python"
if [ ! -x "$py" ]; then
  python3 -m venv "$venv" >&2
  "$py" -m pip install -q --upgrade pip >&2
fi
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  "$py" -m pip install -q torch==2.13.0 >&2
fi
files=("$root/requirements.txt")
[ "${1:-}" = "test" ] && files+=("$root/requirements-test.txt")
stamp="$venv/.sdt-stamp-${1:-main}"
sum="$(cat "${files[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
  for f in "${files[@]}"; do "$py" -m pip install -q -r "$f" >&2; done
  # open_clip ships the CLIP BPE vocabulary our offline tokenizer is built from; its own
  # dependencies (torchvision, timm) are not needed, so it is installed without them.
  "$py" -m pip install -q --no-deps open-clip-torch==3.3.0 >&2
  echo "$sum" > "$stamp"
fi
echo "$py"
