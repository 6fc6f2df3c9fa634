"""Prompt -> conditioning (spec generation §5): oracle = diffusers' own prompt encoders on the tiny models."""
from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.models.loading import load_models
from library.sampling.text_encoding import (GEN_IMG_CLIP_SKIP, default_clip_skip, encode_for_training_samples,
                                            encode_prompts)
from library.sampling.textual_inversion import load_textual_inversion
from library.formats.ti_embedding import embedding_state_dict, save_embedding_file, sdxl_embedding_state_dict
from tools.make_tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_te")
    return {f: write_tiny_model(f, out, formats=("diffusers",))["diffusers"] for f in ("sd1", "sdxl")}


def _encode(models, prompts, **kw):
    with torch.no_grad():
        return encode_prompts(models.family, models.text_encoders, models.tokenizers, prompts, **kw)


def test_sd1_matches_diffusers_encode_prompt(tiny):
    from diffusers import StableDiffusionPipeline

    models = load_models(str(tiny["sd1"]))
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny["sd1"]), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    with torch.no_grad():
        ref, ref_neg = pipe.encode_prompt("a photo of a cat", "cpu", 1, True, negative_prompt="blurry")
    ours = _encode(models, ["blurry", "a photo of a cat"], clip_skip=1)
    assert ours.context.shape == (2, 77, 32)
    torch.testing.assert_close(ours.context[1:], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.context[:1], ref_neg, atol=1e-6, rtol=0)


def test_sdxl_matches_diffusers_encode_prompt(tiny):
    from diffusers import StableDiffusionXLPipeline

    models = load_models(str(tiny["sdxl"]))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny["sdxl"]))
    with torch.no_grad():
        pe, ne, pp, npool = pipe.encode_prompt("a photo of a cat", negative_prompt="blurry",
                                               do_classifier_free_guidance=True)
    ours = _encode(models, ["blurry", "a photo of a cat"])  # default clip_skip 2 = diffusers' penultimate
    assert ours.context.shape == (2, 77, 96) and ours.pooled.shape == (2, 64)
    torch.testing.assert_close(ours.context, torch.cat([ne, pe]), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.pooled, torch.cat([npool, pp]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_weight_one_equals_unweighted(tiny, family):
    models = load_models(str(tiny[family]))
    out = _encode(models, ["a cat on a mat", "a (cat:1.0) on a mat", "a (cat:1.3) on a mat"])
    assert torch.equal(out.context[0], out.context[1])
    assert not torch.allclose(out.context[0], out.context[2])


def test_weighting_modes_and_long_prompts(tiny):
    models = load_models(str(tiny["sd1"]))
    prompts = ["(red:1.5) apple"]
    original = _encode(models, prompts, emb_normalize_mode="original").context
    none = _encode(models, prompts, emb_normalize_mode="none").context
    assert not torch.allclose(original, none)
    # original keeps the per-prompt mean of the unweighted embedding (spec §5.3)
    plain = _encode(models, ["red apple"]).context
    torch.testing.assert_close(original.mean(), plain.mean(), atol=1e-5, rtol=1e-4)
    long = " ".join(["word"] * 160)
    assert _encode(models, [long], max_embeddings_multiples=3).context.shape[1] == 3 * 77
    assert _encode(models, [long]).context.shape[1] == 77  # truncated to 75 tokens by default
    # BREAK pads to the next 77 tokens -> a second chunk
    assert _encode(models, ["a BREAK b"], max_embeddings_multiples=2).context.shape[1] == 2 * 77


def test_training_sample_encoder_is_lpw_semantics(tiny):
    models = load_models(str(tiny["sd1"]))
    long = " ".join(["word"] * 300)
    with torch.no_grad():
        train = encode_for_training_samples("sd1", models.text_encoders, models.tokenizers, [long, "x BREAK y"])
    assert train.context.shape[1] == 3 * 77  # max_embeddings_multiples 3
    ref = _encode(models, [long, "x BREAK y"], clip_skip=1, max_embeddings_multiples=3, pad_with="eos",
                  break_isolation=False)
    assert torch.equal(train.context, ref.context)


def test_clip_skip_defaults():
    assert GEN_IMG_CLIP_SKIP == {"sd1": 1, "sd2": 2, "sdxl": 2}  # SD2 = 2: upstream default (spec pitfall 5)
    assert default_clip_skip("sd2", None, for_training=True) == 1
    assert default_clip_skip("sd1", 3) == 3


def test_textual_inversion_tokens_expand(tiny, tmp_path):
    models = load_models(str(tiny["sd1"]))
    vectors = torch.randn(2, 32)
    path = tmp_path / "mytok.safetensors"
    save_embedding_file(path, embedding_state_dict(vectors))
    replacers = load_textual_inversion("sd1", models.text_encoders, models.tokenizers, [str(path)])
    tok = models.tokenizers[0]
    ids = tok.convert_tokens_to_ids(["mytok", "mytok1"])
    assert ids == [ids[0], ids[0] + 1]
    torch.testing.assert_close(models.text_encoders[0].get_input_embeddings().weight[ids], vectors)
    short = _encode(models, ["a mytok"], token_replacers=replacers).context
    spelled = _encode(models, ["a mytok mytok1"]).context
    assert torch.equal(short, spelled)
    with pytest.raises(UserError, match="already exists"):
        load_textual_inversion("sd1", models.text_encoders, models.tokenizers, [str(path)])


def test_textual_inversion_sdxl(tiny, tmp_path):
    models = load_models(str(tiny["sdxl"]))
    path = tmp_path / "xltok.safetensors"
    save_embedding_file(path, sdxl_embedding_state_dict(torch.randn(1, 32), torch.randn(1, 64)))
    replacers = load_textual_inversion("sdxl", models.text_encoders, models.tokenizers, [str(path)])
    out = _encode(models, ["a xltok"], token_replacers=replacers)
    assert out.context.shape == (1, 77, 96)
    bad = tmp_path / "bad.safetensors"
    save_embedding_file(bad, embedding_state_dict(torch.randn(1, 48)))
    with pytest.raises(UserError):
        load_textual_inversion("sd1", models.text_encoders[:1], models.tokenizers[:1], [str(bad)])
