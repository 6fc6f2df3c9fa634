"""LoRA files: save -> load round trip, dtype, metadata and sshs hashes (spec file-formats §a.2, §b.2)."""
from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file

import networks.lora as lora
from library.errors import UserError
from library.formats.model_hashes import precalculate_safetensors_hashes

from .helpers import randomize_up, text_encoder_arg


def _parse(path) -> tuple[dict, bytes]:
    """(header JSON, data region) of a safetensors file, read by hand."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _network(models, **kw):
    net = lora.create_network(1.0, 4, 2.0, None, text_encoder_arg(models), models.unet, **kw)
    randomize_up(net)
    net.apply_to(text_encoder_arg(models), models.unet)
    return net


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_safetensors_round_trip_bit_exact(tiny, tmp_path, dtype):
    models = tiny("sd1")
    net = _network(models, conv_dim="2")
    path = tmp_path / "net.safetensors"
    metadata = {"ss_network_dim": "4", "ss_network_alpha": "2.0", "modelspec.title": "t"}
    net.save_weights(str(path), dtype, dict(metadata))
    saved = load_file(str(path))
    expected = {k: (v.to(dtype) if dtype else v) for k, v in net.state_dict().items()}
    assert saved.keys() == expected.keys()
    for k, v in expected.items():
        assert saved[k].dtype == v.dtype and torch.equal(saved[k], v), k
    assert all(saved[k].ndim == 0 for k in saved if k.endswith(".alpha"))

    header, data = _parse(path)
    meta = header["__metadata__"]
    assert {k: meta[k] for k in metadata} == metadata
    assert meta["sshs_model_hash"] == hashlib.sha256(data).hexdigest()  # hashed after the cast (pitfall 10)
    # the legacy hash needs the header holding only ss_* keys (pitfall 6): recompute from the tensors
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == precalculate_safetensors_hashes(saved, metadata)

    other = tiny("sd1", seed=1)
    loaded, _ = lora.create_network_from_weights(1.0, str(path), None, other.text_encoders[0], other.unet)
    loaded.apply_to(other.text_encoders[0], other.unet)
    info = loaded.load_weights(str(path))
    assert not info.missing_keys and not info.unexpected_keys
    for k, v in loaded.state_dict().items():
        assert torch.equal(v.to(saved[k].dtype), saved[k])
    resaved = tmp_path / "again.safetensors"
    loaded.save_weights(str(resaved), dtype or torch.float32, dict(metadata))
    assert _parse(resaved)[1] == data


def test_legacy_hash_window():
    """Legacy hash = first 8 hex of SHA-256 of 0x10000 bytes at 0x100000 of the ss_*-only buffer."""
    from safetensors.torch import save

    sd = {"a.alpha": torch.tensor(1.0), "a.lora_down.weight": torch.randn(600, 1000)}
    meta = {"ss_x": "1", "other": "dropped"}
    buffer = save(sd, {"ss_x": "1"})
    model_hash, legacy = precalculate_safetensors_hashes(sd, meta)
    assert legacy == hashlib.sha256(buffer[0x100000:0x110000]).hexdigest()[:8]
    n = int.from_bytes(buffer[:8], "little")
    assert model_hash == hashlib.sha256(buffer[8 + n:]).hexdigest()


@pytest.mark.parametrize("ext", [".ckpt", ".pt"])
def test_ckpt_is_plain_tensor_dict(tiny, tmp_path, ext):
    models = tiny("sd1")
    net = _network(models)
    path = tmp_path / f"net{ext}"
    net.save_weights(str(path), torch.float16, {"ss_x": "1"})
    sd = torch.load(str(path), weights_only=True)
    assert isinstance(sd, dict) and list(sd) == list(net.state_dict())
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert list(tmp_path.iterdir()) == [path]  # written through a temporary name, nothing left over


def test_from_weights_takes_ranks_alphas_and_only_present_names(tiny, tmp_path):
    models = tiny("sd1")
    net = lora.create_network(1.0, 4, 2.0, None, models.text_encoders[0], models.unet, conv_dim="2",
                              conv_alpha="3")
    net.apply_to(models.text_encoders[0], models.unet, apply_text_encoder=False)
    sd = dict(net.state_dict())
    name = net.unet_loras[0].lora_name
    del sd[f"{name}.alpha"]  # old files without alpha: alpha = rank
    sd = {k: v for k, v in sd.items() if "attn2" not in k}
    other = tiny("sd1")
    loaded, weights = lora.create_network_from_weights(1.0, None, None, other.text_encoders[0], other.unet, sd)
    assert weights is sd and not loaded.text_encoder_loras
    names = {k.split(".")[0] for k in sd}
    assert {m.lora_name for m in loaded.unet_loras} == names
    by_name = {m.lora_name: m for m in loaded.unet_loras}
    assert by_name[name].scale == 1.0 and float(by_name[name].alpha) == 4.0
    convs = [m for m in loaded.unet_loras if m.lora_down.weight.ndim == 4 and m.lora_down.kernel_size == (3, 3)]
    assert convs and {(m.lora_dim, float(m.alpha)) for m in convs} == {(2, 3.0)}


def test_load_weights_is_non_strict(tiny, tmp_path):
    models = tiny("sd1")
    net = _network(models)
    path = tmp_path / "partial.safetensors"
    from safetensors.torch import save_file

    first = net.text_encoder_loras[0].lora_name
    save_file({f"{first}.lora_up.weight": torch.ones_like(net.text_encoder_loras[0].lora_up.weight),
               "not_a_module.alpha": torch.tensor(1.0)}, str(path))
    info = net.load_weights(str(path))
    assert info.unexpected_keys == ["not_a_module.alpha"]
    assert torch.equal(net.text_encoder_loras[0].lora_up.weight.detach(),
                       torch.ones_like(net.text_encoder_loras[0].lora_up.weight))


def test_missing_weights_file_is_user_error(tiny, tmp_path):
    models = tiny("sd1")
    with pytest.raises(UserError, match="not found: .*nope.safetensors"):
        lora.create_network_from_weights(1.0, str(tmp_path / "nope.safetensors"), None, models.text_encoders[0],
                                         models.unet)


def test_sd2_proj_loads_from_4d_or_2d(tiny):
    """Pitfall 7: SD2 proj_in/out tensors may be 4-D (single-file base) while our SD2 U-Net has Linear proj."""
    models = tiny("sd2")
    net = _network(models)
    sd = {k: (v[:, :, None, None] if "proj_in" in k and v.ndim == 2 else v) for k, v in net.state_dict().items()}
    assert any(v.ndim == 4 for k, v in sd.items() if "proj_in" in k)
    other = tiny("sd2")
    loaded, _ = lora.create_network_from_weights(1.0, None, None, other.text_encoders[0], other.unet, sd)
    loaded.apply_to(other.text_encoders[0], other.unet)
    info = loaded.load_state_dict(sd, strict=False)
    assert not info.missing_keys and not info.unexpected_keys
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, net.state_dict()[k])
