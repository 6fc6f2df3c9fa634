"""Comparison helpers for model tests."""
import torch


def assert_state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), sorted(set(sa) ^ set(sb))[:5]
    bad = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not bad, f"{len(bad)} tensors differ, first: {bad[:3]}"


def all_parts(models):
    """(name, module) pairs of a model set or a diffusers pipeline, in a fixed order."""
    if hasattr(models, "text_encoders"):
        tes = models.text_encoders
    else:
        tes = [models.text_encoder] + ([models.text_encoder_2] if getattr(models, "text_encoder_2", None) else [])
    return [("unet", models.unet), ("vae", models.vae)] + [(f"te{i}", t) for i, t in enumerate(tes)]
