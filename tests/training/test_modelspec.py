"""modelspec.* keys per family and kind, spec file-formats §b.3."""
import datetime
import re

import pytest

from library.config.options import build_parser
from library.config.option_record import OptionRecord
from library.formats.modelspec import build_modelspec, family_from_options, modelspec_from_options

TS = 1712495272.654321
GM = "https://github.com/Stability-AI/generative-models"

# family, v_param, kind -> architecture, implementation, default resolution
TABLE = [
    ("sd1", False, "lora", "stable-diffusion-v1/lora", "diffusers", "512x512"),
    ("sd1", True, "lora", "stable-diffusion-v1/lora", "diffusers", "512x512"),
    ("sd2", False, "lora", "stable-diffusion-v2-512/lora", "diffusers", "512x512"),
    ("sd2", True, "lora", "stable-diffusion-v2-768-v/lora", "diffusers", "768x768"),
    ("sdxl", False, "lora", "stable-diffusion-xl-v1-base/lora", GM, "1024x1024"),
    ("sd1", False, "textual-inversion", "stable-diffusion-v1/textual-inversion", GM, "512x512"),
    ("sd2", True, "textual-inversion", "stable-diffusion-v2-768-v/textual-inversion", GM, "768x768"),
    ("sdxl", False, "textual-inversion", "stable-diffusion-xl-v1-base/textual-inversion", GM, "1024x1024"),
    ("sd1", False, "checkpoint", "stable-diffusion-v1", GM, "512x512"),
    ("sd2", False, "checkpoint", "stable-diffusion-v2-512", GM, "512x512"),
    ("sd2", True, "checkpoint", "stable-diffusion-v2-768-v", GM, "768x768"),
    ("sdxl", False, "checkpoint", "stable-diffusion-xl-v1-base", GM, "1024x1024"),
]

MUST_KEYS = {"modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
             "modelspec.resolution", "modelspec.date", "modelspec.prediction_type"}


@pytest.mark.parametrize("family, vpred, kind, arch, impl, reso", TABLE)
def test_architecture_implementation_resolution(family, vpred, kind, arch, impl, reso):
    meta = build_modelspec(family, vpred, kind, timestamp=TS)
    assert set(meta) == MUST_KEYS  # optional keys omitted when not given
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == arch
    assert meta["modelspec.implementation"] == impl
    assert meta["modelspec.resolution"] == reso
    assert meta["modelspec.prediction_type"] == ("v" if vpred else "epsilon")
    assert all(isinstance(v, str) for v in meta.values())


@pytest.mark.parametrize("kind, prefix", [("lora", "LoRA"), ("textual-inversion", "TextualInversion"),
                                          ("checkpoint", "Checkpoint")])
def test_title_defaults(kind, prefix):
    assert build_modelspec("sd1", False, kind, timestamp=TS)["modelspec.title"] == f"{prefix}@{TS}"
    assert build_modelspec("sd1", False, kind, timestamp=TS, output_name="out")["modelspec.title"] == "out"
    meta = build_modelspec("sd1", False, kind, timestamp=TS, output_name="out", title="My title")
    assert meta["modelspec.title"] == "My title"


def test_date_is_local_iso_seconds():
    date = build_modelspec("sd1", False, "lora", timestamp=TS)["modelspec.date"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", date)
    assert date == datetime.datetime.fromtimestamp(int(TS)).isoformat()


@pytest.mark.parametrize("reso, expected", [(768, "768x768"), ("640", "640x640"), ("768,512", "768x512"),
                                            ((832, 1216), "832x1216"), ([640], "640x640")])
def test_resolution_forms(reso, expected):
    assert build_modelspec("sdxl", False, "lora", resolution=reso, timestamp=TS)["modelspec.resolution"] == expected


def test_optional_keys():
    meta = build_modelspec("sd1", False, "lora", timestamp=TS, author="me", description="d", license="MIT",
                           tags="a,b", merged_from="x, y", min_timestep=100, clip_skip=2)
    assert meta["modelspec.author"] == "me"
    assert meta["modelspec.description"] == "d"
    assert meta["modelspec.license"] == "MIT"
    assert meta["modelspec.tags"] == "a,b"
    assert meta["modelspec.merged_from"] == "x, y"
    assert meta["modelspec.timestep_range"] == "100,1000"
    assert meta["modelspec.encoder_layer"] == "2"
    assert "modelspec.thumbnail" not in meta and "modelspec.hash_sha256" not in meta
    assert build_modelspec("sd1", False, "lora", max_timestep=500)["modelspec.timestep_range"] == "0,500"
    assert build_modelspec("sd1", False, "lora", min_timestep=10, max_timestep=900)[
        "modelspec.timestep_range"] == "10,900"


def test_bad_family_or_kind():
    with pytest.raises(ValueError, match="family"):
        build_modelspec("sd3", False, "lora")
    with pytest.raises(ValueError, match="kind"):
        build_modelspec("sd1", False, "lycoris")


def test_from_options():
    args = build_parser("sdxl_train_network").parse_args([
        "--pretrained_model_name_or_path", "m", "--output_name", "out", "--resolution", "1024,768",
        "--metadata_author", "me", "--metadata_tags", "x,y", "--min_timestep", "200", "--clip_skip", "2"])
    args = OptionRecord.of(args)
    family = family_from_options(args, sdxl=True)
    meta = modelspec_from_options(args, family, "lora", timestamp=TS)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.title"] == "out"
    assert meta["modelspec.resolution"] == "1024x768"
    assert meta["modelspec.author"] == "me" and meta["modelspec.tags"] == "x,y"
    assert meta["modelspec.timestep_range"] == "200,1000"
    assert meta["modelspec.encoder_layer"] == "2"
    assert "modelspec.license" not in meta
    v2 = build_parser("train_network").parse_args(["--pretrained_model_name_or_path", "m", "--v2",
                                                   "--v_parameterization"])
    v2 = OptionRecord.of(v2)
    assert family_from_options(v2) == "sd2"
    assert modelspec_from_options(v2, "sd2", "lora", TS)["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
