"""Sample-prompt files (spec generation §4) and gen_img prompt-line options (§3)."""
from __future__ import annotations

import json

import pytest

from library.errors import UserError
from library.sampling.prompt_file import (
    PromptOptions,
    line_to_prompt_dict,
    load_sample_prompts,
    pad_with_last,
    parse_prompt_line,
)

DEFAULTS = {"negative_prompt": None, "width": 512, "height": 512, "sample_steps": 30, "scale": 7.5,
            "seed": None, "controlnet_image": None, "sample_sampler": "ddim"}


def _write(tmp_path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


# ---- §4 training sample prompts ----

def test_txt_lines_options_and_defaults(tmp_path):
    path = _write(tmp_path, "p.txt", "\n".join([
        "# comment",
        "",
        "   ",
        "a cat --w 640 --h 500 --d 42 --s 2000 --l 5.5 --n ugly, blurry --ss euler_a --cn hint.png",
        "  # not a comment: the raw first character is a space",
        "a dog",
    ]))
    p = load_sample_prompts(path, default_sampler="ddim")
    assert len(p) == 3
    assert p[0] == {"prompt": "a cat", "width": 640, "height": 496, "seed": 42, "sample_steps": 1000,
                    "scale": 5.5, "negative_prompt": "ugly, blurry", "sample_sampler": "euler_a",
                    "controlnet_image": "hint.png", "enum": 0}
    assert p[1]["prompt"] == "# not a comment: the raw first character is a space"
    assert p[2] == {"prompt": "a dog", **DEFAULTS, "enum": 2}


def test_txt_option_keys_case_insensitive_and_minimums(tmp_path):
    path = _write(tmp_path, "p.txt", "x --W 10 --H 70 --S 0\n")
    (p,) = load_sample_prompts(path)
    assert (p["width"], p["height"], p["sample_steps"]) == (64, 64, 1)


def test_prompt_text_is_never_read_as_options():
    # spec pitfall 1: upstream turned "n ..." / "w 512 ..." at the start of the prompt into options
    assert line_to_prompt_dict("n dog on a hill --w 768") == {"prompt": "n dog on a hill", "width": 768}
    assert line_to_prompt_dict("w 512 pixels wide") == {"prompt": "w 512 pixels wide"}


def test_unparsable_option_is_logged_and_ignored(caplog):
    with caplog.at_level("WARNING"):
        d = line_to_prompt_dict("x --l 1..5 --w abc --zz 3 --h 640")
    assert d == {"prompt": "x", "height": 640}
    assert "--l 1..5" in caplog.text and "--w abc" in caplog.text and "--zz 3" in caplog.text


def test_toml_merge(tmp_path):
    path = _write(tmp_path, "p.toml", """
[prompt]
negative_prompt = "lowres"
width = 768
sample_steps = 20

[[prompt.subset]]
prompt = "first"
seed = 1

[[prompt.subset]]
prompt = "second"
height = 1024
""")
    a, b = load_sample_prompts(path, default_sampler="euler")
    assert a == {**DEFAULTS, "prompt": "first", "negative_prompt": "lowres", "width": 768, "sample_steps": 20,
                 "seed": 1, "sample_sampler": "euler", "enum": 0}
    assert b["prompt"] == "second" and b["height"] == 1024 and b["width"] == 768 and b["enum"] == 1
    assert "subset" not in a


def test_toml_duplicate_key_is_clear_error(tmp_path):
    path = _write(tmp_path, "p.toml", '[prompt]\nwidth = 512\n[[prompt.subset]]\nprompt = "a"\nwidth = 768\n')
    with pytest.raises(UserError, match=r"p\.toml.*width.*both"):
        load_sample_prompts(path)


@pytest.mark.parametrize("text", ['[other]\nx = 1\n', '[prompt]\nprompt = "a"\n', "not = [toml"])
def test_toml_bad_layout(tmp_path, text):
    with pytest.raises(UserError, match="p.toml"):
        load_sample_prompts(_write(tmp_path, "p.toml", text))


def test_json_mixed_list(tmp_path):
    path = _write(tmp_path, "p.json", json.dumps([
        {"prompt": "a", "width": 1000, "scale": 4, "seed": "7"},
        "b --n bad --d 3",
    ]))
    a, b = load_sample_prompts(path)
    assert a == {**DEFAULTS, "prompt": "a", "width": 1000, "scale": 4.0, "seed": 7, "enum": 0}
    assert b == {**DEFAULTS, "prompt": "b", "negative_prompt": "bad", "seed": 3, "enum": 1}


@pytest.mark.parametrize("text", ['{"prompt": "a"}', "[1, 2]", "[oops"])
def test_json_bad_layout(tmp_path, text):
    with pytest.raises(UserError, match="p.json"):
        load_sample_prompts(_write(tmp_path, "p.json", text))


def test_bad_value_in_dict(tmp_path):
    path = _write(tmp_path, "p.json", json.dumps([{"prompt": "a", "width": "wide"}]))
    with pytest.raises(UserError, match="prompt #1"):
        load_sample_prompts(path)


def test_unsupported_extension_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"unsupported.*\.yaml"):
        load_sample_prompts(_write(tmp_path, "p.yaml", "x"))
    with pytest.raises(UserError, match="not found"):
        load_sample_prompts(str(tmp_path / "missing.txt"))


# ---- §3 gen_img prompt lines ----

def test_no_options():
    prompt, opts = parse_prompt_line("  a photo of a cat  \n")
    assert prompt == "a photo of a cat" and opts == PromptOptions() and opts.overrides() == {}


def test_every_line_option():
    line = ("a cat --w 768 --h 512 --ow 1024 --oh 1000 --nw 900 --nh 800 --ct 10 --cl 20 --s 5000 --d 1,2,3"
            " --l 6.5 --nl 2.5 --t 0.6 --n bad hands --c clip text --am 0.5,-1 --dsd1 3 --dst1 600 --dsd2 4"
            " --dst2 500 --dsr 0.4 --glt 700 --glr 0.3 --gle 2 --gls 0.1 --glsn 0.9 --glus 3,0.5,0.2,1")
    prompt, o = parse_prompt_line(line)
    assert prompt == "a cat"
    assert o.overrides() == {
        "width": 768, "height": 512, "original_width": 1024, "original_height": 1000,
        "original_width_negative": 900, "original_height_negative": 800, "crop_top": 10, "crop_left": 20,
        "steps": 1000, "seeds": [1, 2, 3], "scale": 6.5, "negative_scale": 2.5, "strength": 0.6,
        "negative_prompt": "bad hands", "clip_prompt": "clip text", "network_muls": [0.5, -1.0],
        "ds_depth_1": 3, "ds_timesteps_1": 600, "ds_depth_2": 4, "ds_timesteps_2": 500, "ds_ratio": 0.4,
        "gradual_latent_timesteps": 700, "gradual_latent_ratio": 0.3, "gradual_latent_every_n_steps": 2,
        "gradual_latent_ratio_step": 0.1, "gradual_latent_s_noise": 0.9,
        "gradual_latent_unsharp_params": [3.0, 0.5, 0.2, 1.0],
    }
    assert o.deep_shrink_given and o.gradual_latent_given


def test_case_insensitive_keys_and_nl_none():
    _, o = parse_prompt_line("x --W 640 --NL None")
    assert o.width == 640 and o.negative_scale is None and o.negative_scale_disabled
    assert o.overrides() == {"width": 640, "negative_scale": None}
    _, o = parse_prompt_line("x --nl none --nl 3")
    assert o.negative_scale == 3.0 and not o.negative_scale_disabled


def test_line_unparsable_values_logged_and_ignored(caplog):
    with caplog.at_level("WARNING"):
        _, o = parse_prompt_line("x --dsd1 1.5 --l 1.2.3 --d 1,,2 --w big --am 1,- --s 0")
    assert o.overrides() == {"steps": 1}
    for bad in ("--dsd1 1.5", "--l 1.2.3", "--d 1,,2", "--w big", "--am 1,-"):
        assert bad in caplog.text
    assert not o.deep_shrink_given and not o.gradual_latent_given


def test_values_run_to_next_option():
    prompt, o = parse_prompt_line("masterpiece, 1girl --n worst quality, lowres --c a--b --w 512")
    assert prompt == "masterpiece, 1girl"
    assert o.negative_prompt == "worst quality, lowres" and o.clip_prompt == "a--b" and o.width == 512


def test_pad_with_last():
    assert pad_with_last([0.5], 3) == [0.5, 0.5, 0.5]
    assert pad_with_last([1.0, 2.0, 3.0], 2) == [1.0, 2.0, 3.0]
