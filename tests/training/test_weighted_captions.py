"""`--weighted_captions` (SD1/SD2): `(tag:w)` captions through the prompt-weighting encoder.

spec cli-options §10, losses-and-noise §9, generation §5.1-5.4. The oracles below build token ids with the
tokenizer directly and run the CLIP text model itself; only the function under test uses our encoder code.
"""
import math

import pytest
import torch

import fine_tune
import sdxl_train_network
import train_db
import train_network
import train_textual_inversion
from library.models.tiny import build_tiny_models
from library.training.objective import conditioning
from library.training.objective.conditioning import encode_sd, encode_sd_weighted, text_conditioning
from tests.training.full_train_helpers import TE, common_args, part, weights
from tests.training.test_script_matrix import _metadata_json
from tests.training.test_train_matrix import _scalars
from tests.training.train_helpers import base_args


@pytest.fixture(scope="module")
def sd1():
    return build_tiny_models("sd1", seed=0)


@pytest.fixture(scope="module")
def sd2():
    return build_tiny_models("sd2", seed=0)


def _plain_ids(tok, caption, length=77, pad=None):
    """[BOS] + caption tokens + [EOS] + padding (the tokenizer's PAD unless `pad` is given), as (1, length)."""
    ids = tok(caption, truncation=True, max_length=length).input_ids
    ids += [tok.pad_token_id if pad is None else pad] * (length - len(ids))
    return torch.tensor([ids])


def _last_hidden(te, ids):
    with torch.no_grad():
        return te(ids).last_hidden_state


def _final_ln(te):
    return getattr(te, "text_model", te).final_layer_norm  # transformers >= 5.6 has no `.text_model`


def _long_caption(n_words):
    words = ["red", "blue", "green", "circle", "square", "shape", "dog", "cat", "tree", "house"]
    return " ".join(words[i % len(words)] for i in range(n_words))


# --- 1. weights all 1: the plain encoder's output ---------------------------------------------------------

@pytest.mark.parametrize("caption", ["a red circle", "(a red circle:1.0)", "", "a (red:1) circle"])
def test_unit_weights_equal_plain_encoder_sd1(sd1, caption):
    """SD1 pads with EOS (pad == eos), so the ids are the dataset's ids and the outputs are equal."""
    te, tok = sd1.text_encoders[0], sd1.tokenizers[0]
    assert tok.pad_token_id == tok.eos_token_id
    plain_text = caption.replace("(", "").replace(")", "").replace(":1.0", "").replace(":1", "")
    with torch.no_grad():
        ours = encode_sd_weighted(te, tok, [caption], None, None)
        # the trainer's own path for the same caption without weights (dataset ids, spec dataset §8.1)
        batch = {"input_ids": _plain_ids(tok, plain_text)[:, None], "captions": [caption]}
        plain = text_conditioning("sd1", [te], batch, clip_skip=None, max_token_length=None, device="cpu",
                                  dtype=torch.float32).context
    assert ours.shape == (1, 77, 32)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    torch.testing.assert_close(ours, _last_hidden(te, _plain_ids(tok, plain_text)), rtol=0, atol=0)


def test_unit_weights_sd2_pad_with_eos(sd2):
    """SD2's tokenizer pads with `!` (id 0) in the dataset; the weighted encoder pads with EOS like upstream's
    LPW code, so it equals the plain encoder on EOS-padded ids, not on the dataset's `!`-padded ids."""
    te, tok = sd2.text_encoders[0], sd2.tokenizers[0]
    assert tok.pad_token_id != tok.eos_token_id
    with torch.no_grad():
        ours = encode_sd_weighted(te, tok, ["a (red circle:1)"], None, None)
    torch.testing.assert_close(ours, _last_hidden(te, _plain_ids(tok, "a red circle", pad=tok.eos_token_id)),
                               rtol=0, atol=0)
    assert not torch.equal(ours, _last_hidden(te, _plain_ids(tok, "a red circle")))


def test_unit_weights_clip_skip_and_batch(sd1):
    """clip_skip 2: hidden_states[-2] + final LN, like plain training; captions of a batch keep their rows."""
    te, tok = sd1.text_encoders[0], sd1.tokenizers[0]
    captions = ["a red circle", "two blue squares on a green floor"]
    ids = torch.cat([_plain_ids(tok, c) for c in captions])
    with torch.no_grad():
        ours = encode_sd_weighted(te, tok, captions, 2, None)
        out = te(ids, output_hidden_states=True)
        expected = _final_ln(te)(out.hidden_states[-2])
        plain = encode_sd(te, ids[:, None], 2, None)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)


# --- 2. a weighted token, by hand ---------------------------------------------------------------------------

@pytest.mark.parametrize("clip_skip", [None, 2])
def test_weighted_token_by_hand(sd1, clip_skip):
    te, tok = sd1.text_encoders[0], sd1.tokenizers[0]
    ids = _plain_ids(tok, "a red circle")
    red = tok("red").input_ids[1]
    assert ids[0, 2] == red  # [BOS, a, red, circle, EOS, ...]
    with torch.no_grad():
        if clip_skip is None:
            e = te(ids).last_hidden_state
        else:
            e = _final_ln(te)(te(ids, output_hidden_states=True).hidden_states[-clip_skip])
        ours = encode_sd_weighted(te, tok, ["a (red:1.5) circle"], clip_skip, None)
    w = torch.ones(1, 77, 1)
    w[0, 2] = 1.5
    e1 = e * w
    e2 = e1 * e.mean() / e1.mean()
    torch.testing.assert_close(ours, e2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, e)
    torch.testing.assert_close(ours.mean(), e.mean())  # mean-preserving


def test_nested_and_square_brackets(sd1):
    """`((red))` = 1.21, `[circle]` = 1/1.1 (generation §5.1), per caption of the batch."""
    te, tok = sd1.text_encoders[0], sd1.tokenizers[0]
    ids = torch.cat([_plain_ids(tok, "a red circle"), _plain_ids(tok, "a red circle")])
    with torch.no_grad():
        e = te(ids).last_hidden_state
        ours = encode_sd_weighted(te, tok, ["a ((red)) [circle]", "a red circle"], None, None)
    w = torch.ones(2, 77, 1)
    w[0, 2], w[0, 3] = 1.1 * 1.1, 1 / 1.1
    e1 = e * w
    e2 = e1 * (e.mean(dim=(1, 2)) / e1.mean(dim=(1, 2)))[:, None, None]
    torch.testing.assert_close(ours, e2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], e[1], rtol=0, atol=0)


def test_gradients_reach_the_text_encoder(sd1):
    te, tok = sd1.text_encoders[0], sd1.tokenizers[0]
    te.zero_grad(set_to_none=True)
    out = encode_sd_weighted(te, tok, ["a (red:1.5) circle"], None, None)
    out.square().sum().backward()
    grads = [p.grad for p in te.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    assert te.get_input_embeddings().weight.grad is not None
    te.zero_grad(set_to_none=True)


# --- 3. long captions: chunks of 75 ------------------------------------------------------------------------

def test_max_token_length_150_gives_two_chunks(sd1):
    """A caption of more than 75 tokens with max_token_length 150: 2 chunks of 77, output length 154 (no
    re-joining, unlike plain training's 152). Oracle: each 77-id row encoded by the CLIP model on its own."""
    te, tok = sd1.text_encoders[0], sd1.tokenizers[0]
    caption = _long_caption(100)
    tokens = tok(caption).input_ids[1:-1]
    assert len(tokens) == 100
    bos, eos = tok.bos_token_id, tok.eos_token_id
    row1 = [bos] + tokens[:75] + [eos]
    row2 = [bos] + tokens[75:] + [eos] * (77 - 1 - 25)
    weighted = "(" + caption.split(" ", 1)[0] + ":1.3) " + caption.split(" ", 1)[1]
    with torch.no_grad():
        expected = torch.cat([te(torch.tensor([row1])).last_hidden_state,
                              te(torch.tensor([row2])).last_hidden_state], dim=1)
        ours = encode_sd_weighted(te, tok, [caption], None, 150)
        ours_w = encode_sd_weighted(te, tok, [weighted], None, 150)
        # the dataset's 2x77 ids, encoded without re-joining, are the same rows for SD1
        plain = encode_sd(te, torch.stack([conditioning_ids(tok, caption, 150)]), None, None)
    assert ours.shape == (1, 154, 32)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    w = torch.ones(1, 154, 1)
    w[0, 1] = 1.3  # the first word, in the first chunk after BOS
    e1 = expected * w
    torch.testing.assert_close(ours_w, e1 * expected.mean() / e1.mean(), rtol=1e-5, atol=1e-6)


def conditioning_ids(tok, caption, max_token_length):
    from library.data.batch import get_input_ids

    return get_input_ids(caption, tok, max_token_length)


def test_chunk_count_follows_the_longest_caption(sd1):
    """Upstream: n = min(max_token_length // 75, chunks the longest caption of the batch needs), so short
    captions give 77 tokens even with max_token_length 225; longer ones are truncated to 75n tokens."""
    te, tok = sd1.text_encoders[0], sd1.tokenizers[0]
    with torch.no_grad():
        assert encode_sd_weighted(te, tok, ["a red circle"], None, 225).shape == (1, 77, 32)
        assert encode_sd_weighted(te, tok, ["a red circle", _long_caption(80)], None, 225).shape == (2, 154, 32)
        assert encode_sd_weighted(te, tok, [_long_caption(300)], None, 225).shape == (1, 231, 32)
        assert encode_sd_weighted(te, tok, [_long_caption(100)], None, None).shape == (1, 77, 32)


# --- 4. the trainers ---------------------------------------------------------------------------------------

@pytest.fixture
def weighted_data(shapes_data):
    for i, f in enumerate(sorted((shapes_data / "2_sks shape").glob("*.caption"))):
        f.write_text(f"a (sks:1.3) shape, [number] {i}", encoding="utf-8")
    return shapes_data


@pytest.fixture
def recorded_captions(monkeypatch):
    """Captions the trainers hand to the weighted encoder (the real encoder still runs)."""
    seen = []
    real = conditioning.encode_sd_weighted

    def spy(te, tok, captions, clip_skip, max_token_length):
        seen.append(list(captions))
        return real(te, tok, captions, clip_skip, max_token_length)

    monkeypatch.setattr(conditioning, "encode_sd_weighted", spy)
    return seen


def _finite_losses(logs):
    losses = [v for k, vs in _scalars(logs).items() if k.startswith("loss") for v in vs]
    assert losses and all(math.isfinite(v) for v in losses)


def test_train_network_with_weighted_captions(tiny_sd, weighted_data, tmp_path, recorded_captions):
    out, logs = tmp_path / "out", tmp_path / "logs"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], weighted_data, out, 2, "--weighted_captions",
                                 "--logging_dir", str(logs), "--caption_prefix", "photo,", "--shuffle_caption",
                                 "--keep_tokens", "1"))
    _finite_losses(logs)
    lora = weights(out / "lora.safetensors")
    assert all(torch.isfinite(v).all() for v in lora.values())
    # the text encoder's LoRA trained: its up weights start at zero, gradients came through the weighted encoder
    te_up = [v for k, v in lora.items() if k.startswith("lora_te_") and "lora_up" in k]
    assert te_up and any(float(v.abs().sum()) > 0 for v in te_up)
    # the dataset's processed captions (prefix kept first, shuffled tags) reach the encoder with their weights
    flat = [c for batch in recorded_captions for c in batch]
    assert flat and all(c.startswith("photo,") and "(sks:1.3) shape" in c for c in flat)


def test_train_db_with_weighted_captions(tiny_sd, weighted_data, tmp_path, recorded_captions):
    out, logs = tmp_path / "out", tmp_path / "logs"
    model = tiny_sd["sd1"]["safetensors"]
    train_db.main(common_args(model, out, 2, "--train_data_dir", str(weighted_data), "--output_name", "db",
                              "--learning_rate", "1e-3", "--weighted_captions", "--max_token_length", "150",
                              "--clip_skip", "2", "--logging_dir", str(logs), "--save_model_as", "safetensors"))
    _finite_losses(logs)
    assert recorded_captions and all("(sks:1.3)" in c for batch in recorded_captions for c in batch)
    trained, base = part(weights(out / "db.safetensors"), TE), part(weights(model), TE)
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k].float(), base[k].float()) for k in base)  # the TE trained


def test_fine_tune_with_weighted_captions(tiny_sd, weighted_data, tmp_path, recorded_captions):
    out, logs = tmp_path / "out", tmp_path / "logs"
    model = tiny_sd["sd1"]["safetensors"]
    fine_tune.main(common_args(model, out, 2, "--in_json", str(_metadata_json(weighted_data, tmp_path)),
                               "--train_data_dir", str(weighted_data / "2_sks shape"), "--output_name", "ft",
                               "--learning_rate", "1e-3", "--weighted_captions", "--train_text_encoder",
                               "--logging_dir", str(logs), "--save_model_as", "safetensors"))
    _finite_losses(logs)
    assert recorded_captions and all("(sks:1.3)" in c for batch in recorded_captions for c in batch)
    trained, base = part(weights(out / "ft.safetensors"), TE), part(weights(model), TE)
    assert any(not torch.equal(trained[k].float(), base[k].float()) for k in base)


def test_sdxl_rejects_weighted_captions(tmp_path, capsys):
    model = tmp_path / "missing.safetensors"
    with pytest.raises(SystemExit) as e:
        sdxl_train_network.main(base_args(model, tmp_path, tmp_path / "o", 1, "--weighted_captions"))
    assert e.value.code == 2
    assert "--weighted_captions is not supported for SDXL" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_textual_inversion_has_no_such_option(tmp_path, capsys):
    """sd-scripts' TI parser is built with support_weighted_captions=False (spec cli-options §10)."""
    with pytest.raises(SystemExit) as e:
        train_textual_inversion.main(["--weighted_captions"])
    assert e.value.code == 2 and "--weighted_captions" in capsys.readouterr().err
