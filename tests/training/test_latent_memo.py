"""The latent memo (training without --cache_latents): an image seen again reuses its VAE moments, and the
latents equal encoding it again, bit for bit (the oracle is the plain encode + sample with the same generator)."""
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

import train_network
from library.training.objective import latent_memo
from library.training.objective.diffusion_step import batch_latents
from tests.training.train_helpers import base_args


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1).eval()


def _plain(vae, images, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return vae.encode(images).latent_dist.sample(generator=g) * 0.5


def _memo(vae, images, seed):
    return batch_latents({"images": images}, vae, 0.5, "cpu", torch.float32, torch.Generator().manual_seed(seed))


def test_repeated_images_reuse_moments_and_draw_the_same_latents(vae):
    pictures = [torch.rand(1, 3, 32, 32) * 2 - 1 for _ in range(3)]
    order = [0, 1, 0, 2, 1, 1, 0]  # batches of one image, as a DreamBooth folder's repeats give them
    for step, i in enumerate(order):
        assert torch.equal(_memo(vae, pictures[i], step), _plain(vae, pictures[i], step)), step
    memo = latent_memo.memo_for(vae)
    assert (memo.misses, memo.hits) == (3, 4)
    # the draw still comes from the step's generator: the same image at two steps gives two samples
    assert not torch.equal(_memo(vae, pictures[0], 100), _memo(vae, pictures[0], 101))


def test_changed_pixels_are_encoded_again(vae):
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    flipped, nudged = image.flip(-1), image.clone()
    nudged[0, 0, 0, 0] += 1e-3
    for step, x in enumerate((image, flipped, nudged)):
        assert torch.equal(_memo(vae, x, step), _plain(vae, x, step))
    memo = latent_memo.memo_for(vae)
    assert (memo.misses, memo.hits) == (3, 0)
    # both seen before, each in a batch of one: a batch of two may round the encoder's last bit differently
    pair = torch.cat([image, nudged])
    torch.testing.assert_close(_memo(vae, pair, 5), _plain(vae, pair, 5), rtol=1e-5, atol=1e-6)
    assert (memo.misses, memo.hits) == (3, 2)
    mixed = torch.cat([image, flipped.flip(-2)])  # one seen, one new: only the new one goes to the VAE
    _memo(vae, mixed, 9)
    assert (memo.misses, memo.hits) == (4, 3)


def test_budget_limits_what_is_kept_and_zero_turns_it_off(vae, monkeypatch):
    row_bytes = 2 * 4 * 16 * 16 * 4  # moments of one 32 px image: 2 x 4 channels x 16 x 16 fp32
    monkeypatch.setenv(latent_memo.BUDGET_ENV, str(1.5 * row_bytes / 2**20))
    images = [torch.rand(1, 3, 32, 32) for _ in range(2)]
    for step, x in enumerate(images + images):
        assert torch.equal(_memo(vae, x, step), _plain(vae, x, step))
    memo = latent_memo.memo_for(vae)
    assert memo.used == row_bytes and len(memo.moments) == 1 and (memo.misses, memo.hits) == (3, 1)
    monkeypatch.setenv(latent_memo.BUDGET_ENV, "0")
    assert latent_memo.memo_for(vae) is None


def test_training_without_latent_cache_equals_encoding_every_step(tiny_sd, shapes_data, tmp_path, monkeypatch):
    """train_network.py on a folder with 2 repeats (each image twice per epoch), 8 steps: the LoRA with the memo
    equals the LoRA with it turned off, tensor for tensor."""
    model = tiny_sd["sd1"]["safetensors"]
    memos, memo_for = [], latent_memo.memo_for
    monkeypatch.setattr(latent_memo, "memo_for", lambda vae: memos.append(memo_for(vae)) or memos[-1])
    monkeypatch.setattr("library.training.objective.diffusion_step.memo_for", latent_memo.memo_for)
    train_network.main(base_args(model, shapes_data, tmp_path / "memo", 8))
    assert memos and memos[-1].hits == 5 and memos[-1].misses == 3  # 3 images x 2 repeats, 8 batches of one
    monkeypatch.setenv(latent_memo.BUDGET_ENV, "0")
    train_network.main(base_args(model, shapes_data, tmp_path / "plain", 8))
    a, b = load_file(str(tmp_path / "memo" / "lora.safetensors")), load_file(str(tmp_path / "plain" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_moments_do_not_depend_on_batch_mates_or_history(vae):
    """Each image's moments are its own batch-of-one encoding: a process that saw other images first (a straight
    run) and a fresh one (a resumed run, another rank) give the same bits for the same batch."""
    a, b, c = (torch.rand(1, 3, 32, 32) * 2 - 1 for _ in range(3))
    with torch.no_grad():
        alone = {name: vae.encode(x).latent_dist.parameters[0] for name, x in (("a", a), ("b", b))}
    warm = latent_memo.LatentMemo(2**20)
    warm.parameters(vae, torch.cat([a, c]), "cpu")  # a seen before, next to another image
    mixed = warm.parameters(vae, torch.cat([a, b]), "cpu")  # a: kept moments; b: new
    fresh = latent_memo.LatentMemo(2**20).parameters(vae, torch.cat([a, b]), "cpu")
    assert torch.equal(mixed, fresh)
    assert torch.equal(fresh[0], alone["a"]) and torch.equal(fresh[1], alone["b"])


@pytest.mark.parametrize("augment", ["--random_crop", "--color_aug"])
def test_dataset_whose_pixels_never_repeat_skips_the_memo(tiny_sd, shapes_data, tmp_path, monkeypatch, augment):
    """random_crop / color_aug give new pixels every step: nothing is hashed or kept, every batch is encoded."""
    monkeypatch.setattr(latent_memo.LatentMemo, "parameters", lambda *a, **k: pytest.fail("memo used"))
    calls = []
    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, *a, **k: calls.append(1) or encode(self, *a, **k))
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "out", 3, augment))
    assert len(calls) == 3 and (tmp_path / "out" / "lora.safetensors").exists()


@pytest.mark.parametrize("value", ["1G", "-5", "nan", "inf"])
def test_unreadable_budget_is_one_line_before_models_load(tiny_sd, shapes_data, tmp_path, capsys, monkeypatch, value):
    from library.training.runners import run_common

    monkeypatch.setattr(run_common, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    monkeypatch.setenv(latent_memo.BUDGET_ENV, value)
    with pytest.raises(SystemExit) as e:
        train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "out", 2))
    assert e.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert latent_memo.BUDGET_ENV in line and repr(value) in line, line
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv(latent_memo.BUDGET_ENV, " 64 ")
    assert latent_memo.check_budget() == 64 * 2**20
