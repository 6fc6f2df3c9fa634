"""Independent oracle: diffusers' own ``from_single_file`` reads our LDM files (issue: foundation §6)."""
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

import convert_model
from library.models.loading import load_models
from tests.models.helpers import all_parts, assert_state_dicts_equal


def _outputs(parts, family):
    """Deterministic forward outputs of every part."""
    g = torch.Generator().manual_seed(0)
    unet, vae, tes = parts["unet"], parts["vae"], [v for k, v in parts.items() if k.startswith("te")]
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    out = {f"te{i}": te(ids, output_hidden_states=True).hidden_states[-2] for i, te in enumerate(tes)}
    ctx_dim = unet.config.cross_attention_dim
    kw = {}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 64, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    x = torch.randn(2, 4, 8, 8, generator=g)
    out["unet"] = unet(x, torch.tensor([10, 900]), torch.randn(2, 77, ctx_dim, generator=g), **kw).sample
    out["vae"] = vae.decode(vae.encode(torch.randn(1, 3, 64, 64, generator=g)).latent_dist.mean).sample
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@torch.no_grad()
def test_diffusers_from_single_file_reads_our_file(tiny_models, tmp_path, family):
    src = tiny_models[family]["diffusers"]
    ours = tmp_path / "model.safetensors"
    convert_model.main([str(src), str(ours)])
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(ours), config=str(src), local_files_only=True)
    source = load_models(str(src))
    theirs_parts, src_parts = dict(all_parts(pipe)), dict(all_parts(source))
    for name in src_parts:
        assert_state_dicts_equal(src_parts[name], theirs_parts[name])
    a, b = _outputs(src_parts, family), _outputs(theirs_parts, family)
    for k in a:
        # weights are bit-identical (above); the forward may pick other kernels for differently laid-out
        # tensors (thread count, strides), so allow float32 rounding only
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@torch.no_grad()
def test_our_loader_matches_diffusers_single_file_loader(tiny_models, family):
    """Both loaders read the same file into the same weights (our reader vs theirs)."""
    f = tiny_models[family]["safetensors"]
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(f), config=str(tiny_models[family]["diffusers"]), local_files_only=True)
    ours = load_models(str(f))
    for (name, a), (_, b) in zip(all_parts(ours), all_parts(pipe)):
        assert_state_dicts_equal(a, b)
