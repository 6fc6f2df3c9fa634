"""Diffusers -> LDM -> Diffusers conversions are bit-exact for SD1, SD2 and SDXL (issue: foundation §5)."""
import pytest
import torch
from safetensors import safe_open

import convert_model
from library.models.loading import load_models
from tests.models.helpers import all_parts, assert_state_dicts_equal

FAMILIES = ["sd1", "sd2", "sdxl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_ldm_diffusers_bit_exact(tiny_models, tmp_path, family):
    src = tiny_models[family]["diffusers"]
    convert_model.main([str(src), str(tmp_path / "m.safetensors")])
    convert_model.main([str(tmp_path / "m.safetensors"), str(tmp_path / "back"), "--use_safetensors"])
    a, b = load_models(str(src)), load_models(str(tmp_path / "back"))
    for (name, ma), (_, mb) in zip(all_parts(a), all_parts(b)):
        assert_state_dicts_equal(ma, mb)


@pytest.mark.parametrize("family", FAMILIES)
def test_ldm_ckpt_ldm_bit_exact(tiny_models, tmp_path, family):
    """A .ckpt pickle round trip keeps every tensor of the source file, extra TE tensors included."""
    src = tiny_models[family]["safetensors"]
    convert_model.main([str(src), str(tmp_path / "m.ckpt"), "--epoch", "3", "--global_step", "7"])
    convert_model.main([str(tmp_path / "m.ckpt"), str(tmp_path / "again.safetensors")])
    obj = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert obj["epoch"] == 3 and obj["global_step"] == 7
    with safe_open(str(src), "pt") as f0, safe_open(str(tmp_path / "again.safetensors"), "pt") as f1:
        assert set(f0.keys()) == set(f1.keys())
        for k in f0.keys():
            assert torch.equal(f0.get_tensor(k), f1.get_tensor(k)), k


@pytest.mark.parametrize("flag,dtype", [(["--fp16"], torch.float16), (["--bf16"], torch.bfloat16),
                                        (["--save_precision_as", "bf16"], torch.bfloat16), ([], torch.float32)])
def test_save_precision(tiny_models, tmp_path, flag, dtype):
    out = tmp_path / "m.safetensors"
    convert_model.main([str(tiny_models["sd1"]["diffusers"]), str(out), *flag])
    with safe_open(str(out), "pt") as f:
        k = "model.diffusion_model.input_blocks.0.0.weight"
        assert f.get_tensor(k).dtype == dtype
        assert f.get_tensor("cond_stage_model.transformer.text_model.embeddings.position_ids").dtype == torch.int64
    src = load_models(str(tiny_models["sd1"]["diffusers"])).unet.state_dict()["conv_in.weight"]
    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("model.diffusion_model.input_blocks.0.0.weight"), src.to(dtype))


def test_metadata_is_parsed_not_evaluated(tiny_models, tmp_path):
    out = tmp_path / "m.safetensors"
    convert_model.main([str(tiny_models["sd1"]["safetensors"]), str(out), "--metadata", "{'title': 'x', 'n': 3}"])
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"title": "x", "n": "3"}
    with pytest.raises(SystemExit) as e:
        convert_model.main([str(tiny_models["sd1"]["safetensors"]), str(tmp_path / "z.safetensors"),
                            "--metadata", "__import__('os').getcwd()"])
    assert e.value.code == 2 and not (tmp_path / "z.safetensors").exists()


def test_reference_model_configs_copied(tiny_models, tmp_path):
    ref = tiny_models["sd1"]["diffusers"]
    convert_model.main([str(tiny_models["sd1"]["safetensors"]), str(tmp_path / "out"), "--reference_model", str(ref)])
    for f in ("scheduler/scheduler_config.json", "tokenizer/vocab.json"):
        assert (tmp_path / "out" / f).read_bytes() == (ref / f).read_bytes()


def test_norm_groups_other_than_32_round_trip(tmp_path):
    """Small demo models use fewer GroupNorm groups; the count travels in our file's metadata."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from library.models.saving import save_ldm_checkpoint
    from library.models.tiny import build_tiny_models, tiny_unet_config, tiny_vae_config

    m = build_tiny_models("sd1")
    torch.manual_seed(1)
    m.unet = UNet2DConditionModel(**{**tiny_unet_config("sd1"), "norm_num_groups": 8})
    m.vae = AutoencoderKL(**{**tiny_vae_config("sd1"), "norm_num_groups": 8})
    f = tmp_path / "m.safetensors"
    save_ldm_checkpoint(m, str(f))
    back = load_models(str(f))
    assert back.unet.config.norm_num_groups == 8 and back.vae.config.norm_num_groups == 8
    for a, b in ((m.unet, back.unet), (m.vae, back.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(SystemExit) as e:
        pass_through = tmp_path / "m.ckpt"
        convert_model.main([str(f), str(pass_through)])
    assert e.value.code == 2 and not pass_through.exists()
