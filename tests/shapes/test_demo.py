"""The demo job (library/shapes/demo.py, tools/demo.py) and its figures (library/shapes/plots.py)."""
import json

import numpy as np
import pytest
from PIL import Image

from library.shapes import demo, plots, world


def test_line_chart_draws_each_series_in_its_colour(tmp_path):
    path = plots.line_chart({"a": ([0, 1, 2], [1.0, 0.5, 0.25]), "b": ([0, 2], [0.2, 0.9])}, tmp_path / "c.png",
                            title="t", xlabel="step", ylabel="loss", size=(320, 200))
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (200, 320, 3)
    for colour in plots.SERIES_COLOURS[:2]:
        assert (np.abs(img.astype(int) - colour).sum(-1) == 0).sum() > 20, colour
    with pytest.raises(ValueError):
        plots.line_chart({"a": ([], [])}, tmp_path / "empty.png")


def test_image_grid_draws_verdicts_in_green_and_red(tmp_path):
    grey = Image.new("RGB", (40, 40), (128, 128, 128))
    path = plots.image_grid([[grey, grey]], tmp_path / "g.png", cell=40, captions=[[("red heart", True), ("none", False)]])
    g = np.asarray(Image.open(path).convert("RGB"))
    assert g.shape == (42 + plots.CAPTION_H, 84, 3)
    bar = g[41:41 + plots.CAPTION_H - 1]
    left, right = bar[:, :40].reshape(-1, 3).tolist(), bar[:, 42:82].reshape(-1, 3).tolist()
    assert left.count(list(plots.VERDICT_OK)) > 200 and list(plots.VERDICT_BAD) not in left
    assert right.count(list(plots.VERDICT_BAD)) > 200 and list(plots.VERDICT_OK) not in right


def test_image_grid_keeps_aspect_and_order(tmp_path):
    red = Image.new("RGB", (80, 40), (255, 0, 0))
    blue = Image.new("RGB", (40, 80), (0, 0, 255))
    path = plots.image_grid([[red, blue], [blue, red]], tmp_path / "g.png", cell=40)
    g = np.asarray(Image.open(path).convert("RGB"))
    assert g.shape == (2 * 42, 2 * 42, 3)
    assert tuple(g[20, 20]) == (255, 0, 0) and tuple(g[2, 20]) == (255, 255, 255)  # 40x20 red, centred
    assert tuple(g[20, 62]) == (0, 0, 255) and tuple(g[62, 20]) == (0, 0, 255)


def test_demo_writes_sd_scripts_config_and_dataset_files(tmp_path):
    """The files the demo hands to train_network.py are ordinary sd-scripts files our parsers accept."""
    from library.config.config_file import parse_args_with_config
    from library.config.dataset_blueprint import dataset_params_from_args
    from library.config.options import build_parser

    s = demo.DemoSettings(images=6, steps=7)
    dataset_toml = demo.make_datasets(tmp_path, s)
    config = demo.write_train_config(tmp_path, dataset_toml, s)
    args = parse_args_with_config(build_parser("train_network"), ["--config_file", str(config)])
    assert args.max_train_steps == 7 and args.network_module == "networks.lora" and args.min_snr_gamma == 5.0
    assert args.network_train_unet_only is True and str(args.dataset_config) == dataset_toml.as_posix()
    (ds,) = dataset_params_from_args(args, "train_network")
    assert ds.enable_bucket and ds.resolution == (64, 64) and ds.bucket_reso_steps == 16
    concept, reg = ds.subsets
    assert not concept.is_reg and reg.is_reg
    captions = sorted(p.read_text().strip() for p in (tmp_path / "data" / "concept" / "1_sks").glob("*.caption"))
    assert len(captions) == 6 and set(captions) <= {f"a {c} sks" for c in world.MODEL_COLORS}
    held = set(world.HELDOUT_PAIRS)
    reg_caps = [p.read_text().strip() for p in (tmp_path / "data" / "reg" / "1_shapes").glob("*.caption")]
    assert len(reg_caps) == 6 and not {tuple(c.split()[1:]) for c in reg_caps} & held

    prompts, groups = demo.write_prompts(tmp_path, s)
    lines = prompts.read_text().splitlines()
    assert len(lines) == 8 * s.prompts_per_color + 5 * s.heldout_prompts_per_pair + 35 * s.train_prompts_per_pair
    assert sum(g == "new concept" for g in groups.values()) == 8 * s.prompts_per_color
    assert all(" --w " in line and " --d " in line for line in lines)


def test_loss_reader_and_moving_average(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "logs" / "run"))
    for step, v in enumerate([3.0, 1.0, 2.0], start=1):
        w.add_scalar("loss/current", v, step)
    w.close()
    assert demo.read_losses(tmp_path / "logs") == ([1, 2, 3], [3.0, 1.0, 2.0])
    assert demo._moving_average([3.0, 1.0, 2.0], k=2) == [3.0, 2.0, 1.5]


def test_demo_rejects_a_missing_base_model(tmp_path, capsys):
    from tools import demo as demo_tool

    with pytest.raises(SystemExit) as e:
        demo_tool.main(["--out", str(tmp_path / "o"), "--base_model", str(tmp_path / "nope.safetensors")])
    assert e.value.code == 2 and "nope.safetensors" in capsys.readouterr().err


# ---------------------------------------------------------------- the committed model really learned

def _judge(paths):
    from library.shapes.evaluate import evaluate_images, prompt_of, summarize

    return summarize(evaluate_images([(p, prompt_of(p)) for p in paths], colors=world.MODEL_COLORS))


def _generate(tmp_path, lines, name):
    import gen_img

    prompts = tmp_path / f"{name}.txt"
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return gen_img.main(["--ckpt", str(demo.DEFAULT_BASE), "--from_file", str(prompts), "--steps", "20",
                         "--sampler", "euler_a", "--scale", "5", "--seed", "1", "--outdir", str(tmp_path / name)])


def test_committed_base_model_composes_colour_and_shape_pairs_it_never_saw(tmp_path):
    """Issue 8 gate: >= 90% prompt accuracy on the 5 held-out colour x shape pairs (8 seeds each),
    judged by the deterministic evaluator among all 8 colours and 6 shapes (docs/demo.md measures 95%)."""
    held = _judge(_generate(tmp_path, world.prompt_lines(list(world.HELDOUT_PAIRS), 8, seed=1000), "held"))
    assert held["n"] == 40 and held["prompt_accuracy"] >= 0.9, held
    pairs = world.split_pairs(world.MODEL_COLORS, world.BASE_SHAPES, world.HELDOUT_PAIRS, "train")
    trained = _judge(_generate(tmp_path, world.prompt_lines(pairs, 1, seed=2000), "train"))
    assert trained["n"] == 35 and trained["prompt_accuracy"] >= 0.9, trained


# the demo's own new-concept prompts (its default, 5 per colour: the headline figure), fewer old ones
SHORT = dict(heldout_prompts_per_pair=2, train_prompts_per_pair=1)


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    """The demo, shortened (fewer prompts; the default training), run once for the tests below."""
    out = tmp_path_factory.mktemp("demo")
    return out, demo.DemoSettings(**SHORT), demo.run_demo(out, demo.DemoSettings(**SHORT))


def test_demo_report_judges_strictly_and_cross_checks(short_demo):
    """Every image gets a strict verdict and a cross-check reading; the report lists the agreement and the
    disagreements; grid.png carries a green or red verdict bar under every image; the loss falls."""
    tmp_path, s, r = short_demo
    before, after = r["before"], r["after"]
    assert after["new concept"]["n"] == 40
    for side in (before, after):
        records = side["images"]
        assert len(records) == 40 + 10 + 35
        assert {x["shape"] for x in records} <= set(world.BASE_SHAPES) | {"heart", "none"}
        differ = [x for x in records if x["shape"] != x["check"]]
        assert side["crosscheck"]["agreement"] == pytest.approx(1 - len(differ) / len(records))
        assert len(side["crosscheck"]["disagreements"]) == len(differ)
    assert r["loss_last"] < r["loss_first"]
    for name in ("report.md", "report.json", "grid.png", "loss.png", "train_network.toml", "dataset.toml"):
        assert (tmp_path / name).is_file(), name
    report = (tmp_path / "report.md").read_text()
    assert "**" in report and "agree on" in report and json.loads((tmp_path / "report.json").read_text())["steps"] == s.steps
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(int)
    assert grid.shape[1] > 8 * 96 and grid.shape[0] > 2 * 96  # 8 new-concept colours + 5 held-out pairs, 2 rows
    bars = sum(int((np.abs(grid - c).sum(-1) == 0).sum()) for c in (plots.VERDICT_OK, plots.VERDICT_BAD))
    assert bars > 2 * 13 * 96 * 6  # a verdict bar (~96 x 12 px) under each of the 26 images


def test_demo_lora_learns_the_new_concept_and_keeps_the_old_ones(short_demo):
    """Issue 19 item 4 target: new concept >= 90% and old prompts >= 85% under the strict judge."""
    after = short_demo[2]["after"]
    assert after["new concept"]["prompt_accuracy"] >= 0.9, after["new concept"]
    old = [after["old, held-out pairs"], after["old, training pairs"]]
    assert sum(g["prompt_accuracy"] * g["n"] for g in old) / sum(g["n"] for g in old) >= 0.85, old
