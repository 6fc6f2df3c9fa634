"""Training with a VAE that does not downsample by 8 (a two-level tiny VAE: factor 2, as diffusers derives
it from the config): cached latents are reused by their true size, and batches of cached latents carry the
bucket's pixel size as the SDXL target size (issue 15 item 10)."""
from __future__ import annotations

import os

import numpy as np
import pytest

import sdxl_train_network
from tests.training.train_helpers import base_args


@pytest.fixture(scope="module")
def sdxl_two_level(tmp_path_factory) -> str:
    from diffusers import AutoencoderKL

    from library.models.saving import save_diffusers
    from library.models.tiny import build_tiny_models

    models = build_tiny_models("sdxl")
    models.vae = AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
                               norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2,
                               up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64)
    folder = tmp_path_factory.mktemp("xl_vae2") / "model"
    save_diffusers(models, str(folder))
    return str(folder)


def test_disk_cache_reused_and_target_size_from_the_vae_factor(sdxl_two_level, shapes_data, tmp_path):
    argv = base_args(sdxl_two_level, shapes_data, tmp_path / "out", 2, "--cache_latents_to_disk",
                     "--network_train_unet_only")
    sdxl_train_network.main(argv)
    npzs = sorted((shapes_data / "2_sks shape").glob("*.npz"))
    assert npzs and all(np.load(p)["latents"].shape[1:] == (32, 32) for p in npzs)  # 64 px / factor 2
    stamps = {p: os.stat(p).st_mtime_ns for p in npzs}
    sdxl_train_network.main([*argv[:argv.index("--output_dir") + 1], str(tmp_path / "out2"),
                             *argv[argv.index("--output_dir") + 2:]])
    assert {p: os.stat(p).st_mtime_ns for p in npzs} == stamps  # valid at factor 2: reused, not re-encoded

    from library.config.options import build_parser
    from library.data.latent_cache import is_cache_valid
    from library.training.runners.run_common import build_data

    assert is_cache_valid(str(npzs[0]), (64, 64), False, False, latent_factor=2)
    assert not is_cache_valid(str(npzs[0]), (64, 64), False, False)  # read as an 8x VAE's it would not fit
    args = build_parser("sdxl_train_network").parse_args(argv)
    args.cache_latents = True
    group, _ = build_data(args, "sdxl_train_network", sdxl=True)
    from library.models.tokenizers import load_tokenizers

    group.tokenizers = load_tokenizers("sdxl", sdxl_two_level, None)
    group.latent_factor = 2
    for info in group.datasets[0].images:
        info.latents_npz = os.path.splitext(info.path)[0] + ".npz"
    group.set_current_epoch(1)
    batch = group[0]
    assert batch["latents"].shape[-2:] == (32, 32)
    assert batch["target_sizes_hw"].tolist() == [[64, 64]] * len(batch["target_sizes_hw"])
