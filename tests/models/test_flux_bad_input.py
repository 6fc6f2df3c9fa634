"""FLUX.1 bad input: one line naming the option or file (exit 2), nothing half-written."""
import pytest
from diffusers import AutoencoderKL

import convert_model
from library.errors import UserError
from library.models.flux_loading import load_flux_models, load_flux_transformer
from library.models.flux_saving import save_flux_ae
from library.models.flux_tiny import tiny_ae_config


def _run(argv, capsys) -> str:
    """stderr of a run that must end with exit code 2 and exactly one ``error:`` line."""
    with pytest.raises(SystemExit) as e:
        convert_model.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    return err


def test_single_file_to_folder_needs_the_other_parts(tiny_flux, tmp_path, capsys):
    out = tmp_path / "out"
    err = _run([str(tiny_flux["dev"]["transformer"]), str(out), "--ae", str(tiny_flux["dev"]["ae"])], capsys)
    assert "holds only the transformer; give --clip_l, --t5xxl" in err
    assert not out.exists()


def test_an_sd_style_ae_is_named(tiny_flux, tmp_path, capsys):
    """A 4-channel VAE given as --ae: the mismatch is named before anything is written."""
    wrong = tmp_path / "sd_vae.safetensors"
    save_flux_ae(AutoencoderKL(**{**tiny_ae_config(), "latent_channels": 4}), str(wrong))
    p = tiny_flux["dev"]
    out = tmp_path / "out"
    err = _run([str(p["transformer"]), str(out), "--ae", str(wrong), "--clip_l", str(p["clip_l"]),
                "--t5xxl", str(p["t5xxl"]), "--tokenizer_cache_dir", str(p["tokenizer_cache_dir"])], capsys)
    assert f"--ae: latent channels x 4 (2x2 patches) is 16, but this FLUX transformer expects 64; is {wrong}" in err
    assert "loading" not in err  # named from the headers, before any weights load
    assert not out.exists()


def test_text_encoder_swapped_is_named(tiny_flux):
    p = tiny_flux["dev"]
    with pytest.raises(UserError, match="--t5xxl: not a T5 encoder"):
        load_flux_models(str(p["transformer"]), ae=str(p["ae"]), clip_l=str(p["clip_l"]), t5xxl=str(p["clip_l"]))


@pytest.mark.parametrize("option", ["--vae", "--reference_model", "--sdxl"])
def test_sd_options_are_refused_for_flux(tiny_flux, tmp_path, capsys, option):
    extra = [option] if option == "--sdxl" else [option, str(tiny_flux["dev"]["diffusers"])]
    err = _run([str(tiny_flux["dev"]["diffusers"]), str(tmp_path / "x.safetensors"), *extra], capsys)
    assert f"error: {option}: not for FLUX.1 models" in err


def test_flux_options_are_refused_for_other_models(tiny_flux, tmp_path, capsys):
    err = _run([str(tiny_flux["dev"]["clip_l"]), str(tmp_path / "x"), "--ae", str(tiny_flux["dev"]["ae"])], capsys)
    assert "--ae is only for FLUX.1 models" in err


def test_folder_to_file_refuses_part_options(tiny_flux, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    err = _run([str(tiny_flux["dev"]["diffusers"]), str(out), "--t5xxl", str(tiny_flux["dev"]["t5xxl"])], capsys)
    assert "--t5xxl: a FLUX.1 single file holds only the transformer" in err
    assert not out.exists()


def test_flux_file_must_be_safetensors(tiny_flux, tmp_path, capsys):
    err = _run([str(tiny_flux["dev"]["diffusers"]), str(tmp_path / "x.ckpt")], capsys)
    assert "FLUX.1 single files are .safetensors" in err


def test_not_a_flux_transformer(tiny_flux):
    with pytest.raises(UserError, match="not a FLUX.1 transformer in the BFL layout"):
        load_flux_transformer(str(tiny_flux["dev"]["ae"]))


def test_missing_part_file_is_named(tiny_flux, tmp_path):
    p = tiny_flux["dev"]
    with pytest.raises(UserError, match=r"nope.safetensors: no such file or folder \(--clip_l\)"):
        load_flux_models(str(p["transformer"]), ae=str(p["ae"]), clip_l=str(tmp_path / "nope.safetensors"),
                         t5xxl=str(p["t5xxl"]))
