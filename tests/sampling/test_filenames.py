"""Output names and PNG text (spec generation §4, §9)."""
from __future__ import annotations

import os
import re

from library.sampling.filenames import (
    a1111_parameters,
    gen_image_name,
    gen_png_text,
    hires_prefix,
    original_image_name,
    sample_image_path,
    sequential_image_name,
    timestamp,
)


def test_sample_image_path_forms():
    ts = "20240102030405"
    assert sample_image_path("out", "lora", 3, epoch=2, seed=42, ts=ts) == \
        os.path.join("out", "sample", "lora_e000002_03_20240102030405_42.png")
    assert sample_image_path("out", "lora", 0, epoch=0, ts=ts) == \
        os.path.join("out", "sample", "lora_e000000_00_20240102030405.png")
    assert sample_image_path("out", None, 12, steps=1500, ts=ts) == \
        os.path.join("out", "sample", "001500_12_20240102030405.png")


def test_timestamp_format():
    assert re.fullmatch(r"\d{14}", timestamp())
    assert re.fullmatch(r"\d{14}", os.path.basename(sample_image_path("o", "n", 0, steps=1)).split("_")[3][:14])


def test_gen_img_names():
    assert gen_image_name("20240102030405", 2, 1234) == "im_20240102030405_002_1234.png"
    assert gen_image_name("20240102030405", 0, 7, hires_prefix(True, True)) == "im_20240102030405_0000_7.png"
    assert sequential_image_name(0) == "im_000001.png"
    assert sequential_image_name(41, hires_prefix(True, False)) == "im_1000042.png"
    assert hires_prefix(False, True) == ""
    assert original_image_name("/data/in/photo.01.jpg") == "photo.01.png"


def test_png_text_keys_and_order():
    text = gen_png_text(prompt="cat", seed=5, sampler="euler_a", steps=30, scale=7.5, raw_prompt="cat --d 5")
    assert text == {"prompt": "cat", "seed": "5", "sampler": "euler_a", "steps": "30", "scale": "7.5",
                    "negative-prompt": "", "raw-prompt": "cat --d 5"}
    full = gen_png_text(prompt="p", seed=1, sampler="ddim", steps=2, scale=3, negative_prompt="n",
                        negative_scale=1.5, clip_prompt="c", sdxl_size={"original_height": 1024, "crop_top": 0})
    assert list(full) == ["prompt", "seed", "sampler", "steps", "scale", "negative-prompt", "negative-scale",
                          "clip-prompt", "original-height", "original-width", "original-height-negative",
                          "original-width-negative", "crop-top", "crop-left"]
    assert full["original-height"] == "1024" and full["original-width"] == "None" and full["crop-top"] == "0"


def test_a1111_parameters():
    assert a1111_parameters(prompt="a cat", negative_prompt="bad", steps=30, sampler="euler_a", scale=7.5,
                            seed=1, width=512, height=512, model="name") == (
        "a cat\nNegative prompt: bad\nSteps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: name")
    assert a1111_parameters(prompt="x", negative_prompt="", steps=4, sampler="dpmsolver", scale=5, seed=2,
                            width=640, height=768) == \
        "x\nSteps: 4, Sampler: dpmsolver, CFG scale: 5, Seed: 2, Size: 640x768"
