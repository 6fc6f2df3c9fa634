"""The configs real front-ends write run here unedited (issue 14): every config of tests/clients/configs
through ``--dry_run``, and one of each kind for 2 real steps on the tiny models.

Only machine-bound values are swapped (see ``fill`` and ``swap_missing_packages``): the paths behind the
placeholders, and options that name a package this machine lacks (8-bit optimizers without
bitsandbytes -> their 32-bit twin, xformers -> SDPA, wandb -> no tracker). Configs for scripts this project
does not have yet are skipped with the reason. The oracle for "runs" is the process outcome (no error,
exit code 0) plus, for the real runs, a saved file that safetensors / torch read back with the trained
network's or model's key names.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import toml
from PIL import Image

from library.config.options import SCRIPTS

CONFIGS = Path(__file__).resolve().parent / "configs"
MANIFEST = toml.load(CONFIGS / "manifest.toml")["config"]
NOT_YET = {
    "sdxl_train_textual_inversion": "sdxl_train_textual_inversion.py is not provided yet (issue 20)",
}
# configs that sd-scripts v0.8.7 itself refuses (an assertion before training): the same refusal here, as one
# error line from the real run and --dry_run alike. file -> text of that line
REFUSED_AS_UPSTREAM = {
    # kohya_ss's GUI test configs for SDXL keep bucket_reso_steps = 1; SDXL needs multiples of 32
    # (upstream: "bucket_reso_steps is 1. it must be divisible by 32")
    "kohya_ss/test-config-sdxl-standard-adamw.toml": "bucket_reso_steps 1 must be divisible by 32",
    "kohya_ss/test-config-sdxl-standard-adamw8bit.toml": "bucket_reso_steps 1 must be divisible by 32",
    "kohya_ss/presets-lora-locon-dadaptation-sdxl.toml": "bucket_reso_steps 1 must be divisible by 32",
}
# one config of each kind also trains for 2 steps (the rest: --dry_run)
REAL_RUNS = {
    "kohya_ss/presets-lora-sd15-edg_loraoptisettings.toml",  # LoRA SD1, 8-bit optimizer, bf16, latents cached
    "kohya_ss/test-config-locon-prodigy.toml",  # LyCORIS plug-in, Prodigy
    "kohya_ss/presets-lora-sdxl-lora-ai_now-adamw-v1.0.toml",  # SDXL LoRA
    "kohya_ss/test-config-dreambooth-adamw.toml",  # train_db
    "kohya_ss/test-config-finetune-adamw-toml.toml",  # fine_tune with a dataset TOML and metadata JSON
    "kohya_ss/test-config-ti-adamw8bit.toml",  # textual inversion
    "lora-scripts/config-lora.toml",  # sections, reg_data_dir = "", lr_restart_cycles
    "LoRA_Easy_Training_Scripts/readme-example.toml",  # backend output + dataset TOML on the command line
    "kohya-colab/lora_trainer.toml",  # colab notebook config + dataset TOML
}
_EIGHT_BIT = {"adamw8bit": "AdamW", "pagedadamw8bit": "AdamW", "pagedadamw": "AdamW", "pagedadamw32bit": "AdamW",
              "lion8bit": "Lion", "pagedlion8bit": "Lion", "sgdnesterov8bit": "SGDNesterov"}


def _missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


def swap_missing_packages(text: str) -> tuple[str, list[str]]:
    """Swap options that name a package this machine lacks; return the text and what was swapped."""
    swaps = []
    if _missing("bitsandbytes"):
        def optimizer(m: re.Match) -> str:
            new = _EIGHT_BIT.get(m.group(3).lower())
            if new is None:
                return m.group(0)
            swaps.append(f"optimizer_type {m.group(3)} -> {new}")
            return f"{m.group(1)}{m.group(2)}{new}{m.group(2)}"

        text = re.sub(r"""^(\s*optimizer_type\s*=\s*)(["'])([^"']*)\2""", optimizer, text, flags=re.M)
        if re.search(r"^\s*use_8bit_adam\s*=\s*true", text, flags=re.M):
            text = re.sub(r"^(\s*)use_8bit_adam\s*=\s*true", r"\1use_8bit_adam = false", text, flags=re.M)
            swaps.append("use_8bit_adam -> AdamW")
    if _missing("xformers") and re.search(r"^\s*xformers\s*=\s*true", text, flags=re.M):
        text = re.sub(r"^(\s*)xformers\s*=\s*true", r"\1xformers = false\n\1sdpa = true", text, flags=re.M)
        swaps.append("xformers -> sdpa")
    if _missing("wandb") and re.search(r"""^\s*log_with\s*=\s*["'](wandb|all)["']""", text, flags=re.M):
        text = re.sub(r"""^\s*log_with\s*=\s*["'](wandb|all)["']\s*$""", "", text, flags=re.M)
        swaps.append("log_with wandb -> (none)")
    return text, swaps


def _images(folder: Path, n: int, size: tuple[int, int] = (64, 64)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    w, h = size
    for i in range(n):
        a = np.zeros((h, w, 3), np.uint8)
        a[:] = rng.integers(0, 255, 3)
        a[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 255, 3)
        path = folder / f"img{i}.png"
        Image.fromarray(a).save(path)
        for ext in (".txt", ".caption"):
            path.with_suffix(ext).write_text(f"sks shape, number {i}", encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def machine(tmp_path_factory, tiny_models):
    """The machine-bound values behind the placeholders, built once per module; image folders are made per
    image size by ``machine["data"](size)``: without buckets sd-scripts takes only images of exactly the
    training resolution, so the images are drawn at the size each config trains at."""
    root = tmp_path_factory.mktemp("frontends")
    (root / "prompts.txt").write_text("a sks shape --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8")
    folders: dict[tuple[int, int], dict[str, Path]] = {}

    def data(size: tuple[int, int]) -> dict[str, Path]:
        if size not in folders:
            folders[size] = _data_folders(root / f"{size[0]}x{size[1]}", size)
        return folders[size]

    return {
        "{MODEL}": tiny_models["sd1"]["safetensors"], "{MODEL_SDXL}": tiny_models["sdxl"]["safetensors"],
        "{VAE}": tiny_models["sd1"]["safetensors"], "{SAMPLE_PROMPTS}": root / "prompts.txt",
        "{NETWORK_WEIGHTS}": _sdxl_lora(tiny_models["sdxl"]["safetensors"], root), "data": data,
    }


def _data_folders(root: Path, size: tuple[int, int]) -> dict[str, Path]:
    data = root / "train"
    flat = _images(data, 2, size)  # fine-tuning: images straight in the folder (+ metadata JSON)
    _images(data / "1_subject", 2, size)  # DreamBooth folder mode: "<repeats>_<name>" sub-folders
    _images(root / "reg" / "1_class", 2, size)
    masks = root / "masks"
    masks.mkdir()
    for p in flat:
        Image.new("RGB", size, (255, 255, 255)).save(masks / p.name)
    meta = {str(p.with_suffix("")): {"caption": f"sks shape {i}", "tags": "shape"} for i, p in enumerate(flat)}
    (root / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return {"{TRAIN_DATA_DIR}": data, "{REG_DATA_DIR}": root / "reg", "{IN_JSON}": root / "meta.json",
            "{CONDITIONING_DATA_DIR}": masks}


def _sdxl_lora(model: Path, root: Path) -> Path:
    """A LoRA of the tiny SDXL model (kohya_ss's finetuning-phase-2 preset continues from one)."""
    from library.models.loading import load_models
    from networks import lora

    models = load_models(str(model))
    net = lora.create_network(1.0, 4, 4, models.vae, models.text_encoders, models.unet)
    net.apply_to(models.text_encoders, models.unet)
    path = root / "phase1.safetensors"
    net.save_weights(str(path), None, {})
    return path


def fill(entry: dict, machine: dict, tmp_path: Path, size: tuple[int, int] | None = None
         ) -> tuple[Path, list[str], list[str]]:
    """Write the entry's config (and dataset TOML) with the placeholders filled and missing packages swapped;
    return the config path, the front-end's command-line extras and the swaps made. Images are drawn at
    ``size`` (default: the resolution the config trains at)."""
    size = size or training_size(entry)
    values = {k: str(v) for k, v in {**machine, **machine["data"](size)}.items() if k.startswith("{")}
    values["{OUTPUT_DIR}"], values["{LOGGING_DIR}"] = str(tmp_path / "out"), str(tmp_path / "logs")
    folder = CONFIGS / Path(entry["file"]).parent
    if entry["dataset_config"]:
        ds_values = dict(values)
        # in a dataset TOML the image_dir is the folder that holds the images (README: placeholders)
        ds_values["{TRAIN_DATA_DIR}"] = values["{TRAIN_DATA_DIR}"] + "/1_subject" \
            if entry["script"] != "fine_tune" else values["{TRAIN_DATA_DIR}"]
        text = _substitute((folder / entry["dataset_config"]).read_text(encoding="utf-8"), ds_values)
        dataset = tmp_path / "dataset.toml"
        dataset.write_text(text, encoding="utf-8")
        values["{DATASET_CONFIG}"] = str(dataset)
    text, swaps = swap_missing_packages(_substitute((CONFIGS / entry["file"]).read_text(encoding="utf-8"), values))
    config = tmp_path / "config.toml"
    config.write_text(text, encoding="utf-8")
    extras = [_substitute(a, values) for a in entry.get("extra_args", [])]
    return config, extras, swaps


def training_size(entry: dict) -> tuple[int, int]:
    """(width, height) the config trains at: its dataset TOML's resolution, else its own, else 512."""
    texts = [(CONFIGS / entry["file"]).read_text(encoding="utf-8")]
    if entry["dataset_config"]:
        texts.insert(0, (CONFIGS / Path(entry["file"]).parent / entry["dataset_config"]).read_text(encoding="utf-8"))
    for text in texts:
        m = re.search(r"^\s*resolution\s*=\s*[\"'\[]?\s*(\d+)(?:\s*,\s*(\d+))?", text, flags=re.M)
        if m:
            return int(m.group(1)), int(m.group(2) or m.group(1))
    return 512, 512


def _substitute(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(key, Path(value).as_posix())
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    left = re.findall(r"\{[A-Z_]+\}", body)
    assert not left, f"unfilled placeholders {left}"
    return text


def _entries(real: bool):
    for entry in MANIFEST:
        marks = []
        if entry["script"] not in SCRIPTS:
            marks.append(pytest.mark.skip(reason=NOT_YET.get(entry["script"], f"{entry['script']}.py not provided")))
        if real and entry["file"] not in REAL_RUNS:
            continue
        yield pytest.param(entry, id=entry["file"], marks=marks)


@pytest.mark.parametrize("entry", list(_entries(real=False)))
def test_frontend_config_passes_dry_run(entry, machine, tmp_path, caplog, capsys):
    """Config + the front-end's own command-line extras, as launched, with --dry_run: no error, a plan."""
    config, extras, _ = fill(entry, machine, tmp_path)
    script = importlib.import_module(entry["script"])
    refused = REFUSED_AS_UPSTREAM.get(entry["file"])
    try:
        script.main(["--config_file", str(config), *extras, "--dry_run"])
    except SystemExit as e:  # a rejected config: show the one error line
        err = capsys.readouterr().err.strip().splitlines()
        if refused and e.code == 2 and refused in err[-1] and "Traceback" not in "".join(err):
            return
        pytest.fail(f"exit {e.code}: {err[-1:]}")
    assert not refused, f"expected the refusal upstream gives: {refused}"
    out = capsys.readouterr().out
    assert f"dry run of {entry['script']}.py" in out and "total steps:" in out


@pytest.mark.parametrize("entry", list(_entries(real=True)))
def test_frontend_config_trains_two_steps(entry, machine, tmp_path, capsys):
    """A real run, with only the step count and (for the tiny models) the resolution given on the command
    line; the saved file is read back."""
    config, extras, swaps = fill(entry, machine, tmp_path, size=(64, 64))
    conf = _flat(toml.loads(config.read_text(encoding="utf-8")))
    short = ["--max_train_steps", "2", "--resolution", "64", "--min_bucket_reso", "64"]
    if conf.get("max_train_epochs"):
        short += ["--max_train_epochs", "1"]
    if entry["dataset_config"]:
        _shrink_dataset(tmp_path / "dataset.toml")
    script = importlib.import_module(entry["script"])
    try:
        script.main(["--config_file", str(config), *extras, *short])
    except SystemExit as e:
        pytest.fail(f"exit {e.code} ({swaps}): {capsys.readouterr().err.strip().splitlines()[-3:]}")
    saved = [p for p in (tmp_path / "out").rglob("*") if p.suffix in (".safetensors", ".pt", ".ckpt")]
    assert saved, f"nothing saved in {tmp_path / 'out'}"
    final = max(saved, key=lambda p: p.stat().st_mtime)
    if final.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(final), "pt") as f:
            keys = list(f.keys())
        assert keys
        if entry["script"] in ("train_network", "sdxl_train_network"):
            assert all(k.startswith("lora_") for k in keys), keys[:3]


def _flat(data: dict) -> dict:
    flat: dict = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _shrink_dataset(path: Path) -> None:
    """Tiny models: the dataset TOML's own resolution and repeats (which the command line cannot override)
    are set to 64 px and 1 repeat; everything else stays the front-end's."""
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^(\s*)resolution\s*=.*$", r"\1resolution = 64", text, flags=re.M)
    text = re.sub(r"^(\s*)num_repeats\s*=.*$", r"\1num_repeats = 1", text, flags=re.M)
    text = re.sub(r"^(\s*)(min_bucket_reso)\s*=.*$", r"\1\2 = 64", text, flags=re.M)
    path.write_text(text, encoding="utf-8")
