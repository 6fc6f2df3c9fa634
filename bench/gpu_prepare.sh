#!/usr/bin/env bash
# Gather, on a machine with the package index, the wheels bench/gpu.sh installs on a GPU machine that has no
# network (issue 16). They land in .whl/ (git-ignored; the device call carries it). The GPU machine already has
# CUDA torch, transformers, accelerate, safetensors, huggingface-hub, numpy, pillow, tqdm, rich, regex,
# tensorboard and pytest: only what it lacks travels, at the versions requirements.txt pins, for CPython 3.12.
# bitsandbytes and xformers are not carried (over the 60 MiB budget, and xformers is tied to one torch build):
# their tests skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
# open-clip-torch: only for the CLIP BPE vocabulary file it ships (library/models/tokenizers.py)
pins=(diffusers==0.42.1 toml==0.10.2 voluptuous==0.16.0 ftfy==6.3.1 wcwidth==0.9.4 open-clip-torch==3.3.0)
# DeepSpeed (tests/gpu/test_sharded_gpu.py: ZeRO 2 / 3) and what it imports; the registry has DeepSpeed only as a
# source archive, so its pure-Python wheel (no compiled ops: DS_BUILD_OPS=0) is built here with the project's torch
pins+=(einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2 py-cpuinfo==9.0.0 pydantic==2.14.4
       pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0)
mkdir -p "$dest"
rm -f "$dest"/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${pins[@]}"
DS_BUILD_OPS=0 "${PYTHON:-.venv/bin/python}" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" deepspeed==0.19.8
size=$(du -sm "$dest" | cut -f1)
if [ "$size" -gt 60 ]; then
    echo "gpu_prepare: $dest is $size MiB, over the 60 MiB budget" >&2
    exit 1
fi
ls "$dest"
echo "gpu_prepare: $(ls "$dest"/*.whl | wc -l) wheels, $size MiB in $dest (carry it: run(carry=[\".whl\"]))"
