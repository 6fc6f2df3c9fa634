#!/usr/bin/env python
"""Generation speed: our pipeline vs diffusers' StableDiffusion(XL)Pipeline on the same tiny model, one run.

    python bench/gen.py [--size 256] [--steps 20] [--batch 4] [--repeats 3] [--sampler euler_a]

Both sides get the same scheduler, seeds, start latents, prompts, CFG and size; times cover text encoding,
the denoising loop and VAE decoding (best of --repeats after a warm-up). CPU unless CUDA is available.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.models.loading import load_models  # noqa: E402
from library.sampling.pipeline import GenSettings, ImageSpec, Pipeline, draw_noise, make_generators  # noqa: E402
from library.sampling.samplers import make_scheduler  # noqa: E402
from tools.make_tiny_model import write_tiny_model  # noqa: E402

PROMPT, NEG = "a photo of a cat sitting on a (red:1.0) sofa", "blurry, low quality"


def _best_interleaved(fns: list, repeats: int) -> list[float]:
    """Best time of each function; runs alternate so background load hits both sides alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


def bench_family(family: str, folder: Path, a: argparse.Namespace, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> list[tuple]:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    models = load_models(str(folder), device=device, dtype=dtype)
    ours = Pipeline(models, device, progress=False)
    seeds = list(range(a.batch))
    settings = GenSettings(a.size, a.size, steps=a.steps, scale=7.5, sampler=a.sampler)
    specs = [ImageSpec(PROMPT, NEG, seed=s) for s in seeds]
    if family == "sdxl":
        ref = StableDiffusionXLPipeline.from_pretrained(str(folder), dtype=dtype)
    else:
        ref = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, feature_extractor=None,
                                                      requires_safety_checker=False, dtype=dtype)
    ref.to(device)
    ref.set_progress_bar_config(disable=True)

    def run_ref():
        ref.scheduler = make_scheduler(a.sampler, False, False)
        gens = make_generators(seeds)
        latents = draw_noise(gens, (4, a.size // 8, a.size // 8), device).to(dtype)
        ref([PROMPT] * a.batch, negative_prompt=[NEG] * a.batch, height=a.size, width=a.size,
            num_inference_steps=a.steps, guidance_scale=7.5, latents=latents, generator=gens, output_type="pil")

    with torch.no_grad():
        t_ours, t_ref = _best_interleaved([lambda: ours.generate(specs, settings), run_ref], a.repeats)
    return [(family, "ours (library.sampling.pipeline)", t_ours, a.batch / t_ours),
            (family, "diffusers StableDiffusion" + ("XL" if family == "sdxl" else "") + "Pipeline", t_ref,
             a.batch / t_ref)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sampler", default="euler_a")
    p.add_argument("--families", default="sd1,sdxl")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in a.families.split(","):
            folder = write_tiny_model(family, tmp, formats=("diffusers",))["diffusers"]
            rows += bench_family(family, folder, a, device)
    print(f"\ndevice {device}, {a.size}x{a.size}, {a.steps} steps {a.sampler}, batch {a.batch}, CFG 7.5, "
          f"best of {a.repeats} (interleaved)\n")
    print("| model | pipeline | seconds / batch | images / s |\n|---|---|---|---|")
    for family, name, secs, ips in rows:
        print(f"| tiny {family} | {name} | {secs:.3f} | {ips:.2f} |")


if __name__ == "__main__":
    main()
