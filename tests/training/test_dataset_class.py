"""--dataset_class: the user's class of docs/training.md trains a LoRA; bad classes are one clear line (exit 2)."""
import importlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import sdxl_train_network
import train_network
import train_textual_inversion
from library.train_util import MinimalDataset
from tools.make_tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _doc_example() -> str:
    """The ```python block of docs/training.md that starts with ``# my_dataset.py``, as written."""
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    return re.search(r"```python\n(# my_dataset\.py\n.*?)```", text, re.S).group(1)


def _pngs(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a picture number {i}\n", encoding="utf-8")
    return folder


def _args(model, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--resolution", "64", "--output_dir", str(out),
            "--output_name", "lora", "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha",
            "4", "--max_train_steps", "2", "--learning_rate", "1e-3", "--seed", "7", "--max_data_loader_n_workers",
            "0", "--console_log_simple", *extra]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a module ``name`` with ``code`` into a folder on sys.path (as a file next to the scripts)."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def write(name: str, code: str) -> None:
        (folder / f"{name}.py").write_text(code, encoding="utf-8")

    return write


def test_doc_example_trains_a_lora(tiny_sd, tmp_path, monkeypatch, user_module):
    user_module("my_dataset", _doc_example())
    monkeypatch.setenv("MY_DATASET_DIR", str(_pngs(tmp_path / "pngs")))
    out = tmp_path / "out"
    train_network.main(_args(tiny_sd["sd1"]["safetensors"], out, "--dataset_class", "my_dataset.FolderDataset"))
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]
    # LoRA's up weights start at zero: non-zero ones were trained by the class's batches
    assert ups and any(float(u.abs().max()) > 0 for u in ups)
    # what upstream's MinimalDataset puts in the metadata, plus the example's own numbers (4 images, 2 per batch)
    assert json.loads(meta["ss_dataset_dirs"]) == {"dummy": {"n_repeats": 1, "img_count": 1}}
    assert meta["ss_num_train_images"] == "4" and meta["ss_num_batches_per_epoch"] == "2"
    assert meta["ss_batch_size_per_device"] == "1"  # --train_batch_size, as upstream writes it


def test_doc_example_trains_sdxl(tmp_path, monkeypatch, user_module):
    """SDXL: the class gets both tokenizers (a list, as upstream) and returns input_ids2; size conditioning
    defaults to the batch's own size."""
    model = write_tiny_model("sdxl", tmp_path / "sdxl")["safetensors"]
    user_module("my_dataset", _doc_example())
    monkeypatch.setenv("MY_DATASET_DIR", str(_pngs(tmp_path / "pngs")))
    out = tmp_path / "out"
    sdxl_train_network.main(_args(model, out, "--dataset_class", "my_dataset.FolderDataset",
                                  "--network_train_unet_only"))
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert any(float(f.get_tensor(k).abs().max()) > 0 for k in f.keys() if k.endswith("lora_up.weight"))


def test_doc_example_batches_reach_the_loop(tiny_sd, tmp_path, monkeypatch, user_module, capsys):
    """--debug_dataset shows the class's own captions and the (B, 1, 77) token ids the loop receives."""
    user_module("my_dataset", _doc_example())
    monkeypatch.setenv("MY_DATASET_DIR", str(_pngs(tmp_path / "pngs")))
    with pytest.raises(SystemExit) as e:
        train_network.main(_args(tiny_sd["sd1"]["safetensors"], tmp_path / "o", "--dataset_class",
                                 "my_dataset.FolderDataset", "--debug_dataset"))
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "['a picture number 0', 'a picture number 1']" in out
    assert "'images': (2, 3, 64, 64)" in out and "'input_ids': (2, 1, 77)" in out


BAD_CLASSES = {
    "no_len": ("class C:\n    def __init__(self, tokenizer, max_token_length, resolution, debug_dataset): pass\n"
               "    def __getitem__(self, i): return {}\n    def set_current_epoch(self, e): pass\n",
               "class C lacks method __len__"),
    "no_epoch": ("class C:\n    def __init__(self, tokenizer, max_token_length, resolution, debug_dataset): pass\n"
                 "    def __len__(self): return 1\n    def __getitem__(self, i): return {}\n",
                 "class C lacks method set_current_epoch"),
    "bad_init": ("class C:\n    def __init__(self, tokenizer): pass\n    def __len__(self): return 1\n"
                 "    def __getitem__(self, i): return {}\n    def set_current_epoch(self, e): pass\n",
                 "C(tokenizer, max_token_length, resolution, debug_dataset)"),
    "broken": ("import not_a_package_anywhere\n", "cannot import module 'bad_broken'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CLASSES))
def test_bad_class_is_one_line_before_models_load(tmp_path, user_module, capsys, case):
    code, message = BAD_CLASSES[case]
    user_module(f"bad_{case}", code)
    # the model path does not exist: the class is checked first, before any file or model is touched
    with pytest.raises(SystemExit) as e:
        train_network.main(_args(tmp_path / "missing.safetensors", tmp_path / "o", "--dataset_class",
                                 f"bad_{case}.C"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0] and f"bad_{case}.C" in err[0]


@pytest.mark.parametrize("path, message", [("nomodule_here.C", "cannot import module 'nomodule_here'"),
                                           ("json.NoSuchClass", "module 'json' has no class 'NoSuchClass'"),
                                           ("NoDots", "expected package.module.ClassName")])
def test_missing_module_or_class_names_it(tmp_path, capsys, path, message):
    with pytest.raises(SystemExit) as e:
        train_network.main(_args(tmp_path / "missing.safetensors", tmp_path / "o", "--dataset_class", path))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_textual_inversion_needs_add_replacement(tmp_path, user_module, capsys):
    user_module("ti_ds", BAD_CLASSES["no_len"][0].replace("class C:", "class C:\n    def __len__(self): return 1"))
    with pytest.raises(SystemExit) as e:
        train_textual_inversion.main(["--pretrained_model_name_or_path", str(tmp_path / "m.safetensors"),
                                      "--output_dir", str(tmp_path), "--token_string", "mychar", "--init_word",
                                      "cat", "--dataset_class", "ti_ds.C"])
    assert e.value.code == 2 and "class C lacks method add_replacement" in capsys.readouterr().err


def test_cache_latents_is_refused(tmp_path, user_module, capsys):
    user_module("my_dataset", _doc_example())
    with pytest.raises(SystemExit) as e:
        train_network.main(_args(tmp_path / "m.safetensors", tmp_path / "o", "--dataset_class",
                                 "my_dataset.FolderDataset", "--cache_latents"))
    assert e.value.code == 2 and "--cache_latents cannot be used with --dataset_class" in capsys.readouterr().err


def test_batch_missing_a_key_names_class_and_key(tiny_sd, tmp_path, user_module, capsys):
    user_module("nocap", "import torch\nfrom library.train_util import MinimalDataset\n\n\n"
                         "class C(MinimalDataset):\n"
                         "    def __init__(self, tokenizer, max_token_length, resolution, debug_dataset):\n"
                         "        super().__init__(tokenizer, max_token_length, resolution)\n"
                         "    def __len__(self): return 1\n"
                         "    def __getitem__(self, i):\n"
                         "        return {'images': torch.zeros(1, 3, 64, 64),\n"
                         "                'input_ids': self.get_input_ids('x')[None]}\n")
    with pytest.raises(SystemExit) as e:
        train_network.main(_args(tiny_sd["sd1"]["safetensors"], tmp_path / "o", "--dataset_class", "nocap.C"))
    assert e.value.code == 2 and "nocap.C: C[i] returned no 'captions'" in capsys.readouterr().err


TI_CLASS = '''import torch
from library.train_util import MinimalDataset


class TokenDataset(MinimalDataset):
    def __init__(self, tokenizer, max_token_length, resolution, debug_dataset):
        super().__init__(tokenizer, max_token_length, resolution, 1.0, debug_dataset)
        self.num_train_images = 2

    def __len__(self):
        return 1

    def __getitem__(self, index):
        captions = [self.replace_tokens("a photo of sks")] * 2
        image = torch.linspace(-1, 1, 3 * 64 * 64).reshape(3, 64, 64)
        return {"images": torch.stack([image, -image]), "captions": captions,
                "input_ids": torch.stack([self.get_input_ids(c) for c in captions])}
'''


def test_textual_inversion_replaces_the_token_through_the_class(tiny_sd, tmp_path, user_module, capsys):
    """train_textual_inversion hands the class its replacement ("sks" -> "sks sks1" for two vectors) before
    training, on the tokenizer that already knows the new tokens."""
    user_module("ti_dataset", TI_CLASS)
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(tiny_sd["sd1"]["safetensors"]), "--output_dir", str(out),
            "--resolution", "64", "--token_string", "sks", "--init_word", "shape", "--num_vectors_per_token", "2",
            "--max_train_steps", "2", "--learning_rate", "1e-2", "--seed", "1", "--max_data_loader_n_workers", "0",
            "--save_model_as", "safetensors", "--dataset_class", "ti_dataset.TokenDataset", "--console_log_simple"]
    with pytest.raises(SystemExit):
        train_textual_inversion.main(argv + ["--debug_dataset"])
    assert "['a photo of sks sks1', 'a photo of sks sks1']" in capsys.readouterr().out
    train_textual_inversion.main(argv)
    with safe_open(str(out / "sks.safetensors"), "pt") as f:
        assert tuple(f.get_tensor("emb_params").shape) == (2, 32)


def test_replace_tokens_as_upstreams_datasets():
    """A substring replacement everywhere; the "" replacement (templates) is the whole caption, one drawn."""
    ds = MinimalDataset(None, None, (64, 64))
    ds.add_replacement("sks", "sks sks1")
    assert ds.replace_tokens("sks and sks") == "sks sks1 and sks sks1"
    templates = ["a photo of sks", "a rendering of sks", "a cropped photo of the sks"]
    ds = MinimalDataset(None, None, None)
    ds.add_replacement("", templates)
    assert ds.replace_tokens("ignored", random.Random(5)) == random.Random(5).choice(templates)
    assert (ds.width, ds.height) == (None, None) and ds.image_dir == "dummy" and ds.datasets == [ds]


@pytest.mark.parametrize("script", ["train_db", "fine_tune"])
def test_doc_example_trains_the_full_model_trainers(tiny_sd, tmp_path, monkeypatch, user_module, script):
    user_module("my_dataset", _doc_example())
    monkeypatch.setenv("MY_DATASET_DIR", str(_pngs(tmp_path / "pngs")))
    out = tmp_path / "out"
    base = tiny_sd["sd1"]["safetensors"]
    importlib.import_module(script).main([
        "--pretrained_model_name_or_path", str(base), "--resolution", "64", "--output_dir", str(out),
        "--output_name", "full", "--max_train_steps", "2", "--learning_rate", "1e-3", "--seed", "7",
        "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors", "--console_log_simple",
        "--dataset_class", "my_dataset.FolderDataset"])
    before, after = load_file(str(base)), load_file(str(out / "full.safetensors"))
    unet = [k for k in before if k.startswith("model.diffusion_model.")]
    assert unet and any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in unet)


def test_the_class_sees_the_global_step(tiny_sd, tmp_path, monkeypatch, user_module):
    """set_current_step gets the optimizer step the loop has counted when each batch is taken (token warmup in
    upstream's datasets reads it): 2 batches per epoch, 3 steps -> 0, 1 in epoch 1 and 2 in epoch 2."""
    user_module("my_dataset", _doc_example())
    user_module("step_recorder", "from my_dataset import FolderDataset\nSEEN = []\n\n\n"
                "class Recording(FolderDataset):\n"
                "    def set_current_step(self, step):\n"
                "        SEEN.append(step)\n"
                "        super().set_current_step(step)\n")
    monkeypatch.setenv("MY_DATASET_DIR", str(_pngs(tmp_path / "pngs")))
    seen = importlib.import_module("step_recorder").SEEN
    train_network.main(_args(tiny_sd["sd1"]["safetensors"], tmp_path / "out", "--max_train_steps", "3",
                             "--dataset_class", "step_recorder.Recording"))
    assert seen == [0, 1, 2]
