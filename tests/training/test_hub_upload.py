"""Hugging Face Hub upload and --resume_from_huggingface (sd-scripts' huggingface_util), with a mocked hub."""
import json
import logging
import os
import shutil
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library.errors import UserError
from library.training.extras import hub_upload
from tests.training.train_helpers import base_args

HUB = ["--huggingface_repo_id", "me/repo", "--huggingface_path_in_repo", "loras", "--huggingface_repo_visibility",
       "private", "--huggingface_token", "hf_secret_token"]


class FakeHub:
    """Records what a run asks of ``HfApi``; ``fail`` makes uploads raise, ``delay`` slows them down."""

    def __init__(self, exists=False, fail=False, delay=0.0):
        self.calls, self.tokens, self.exists, self.fail, self.delay = [], [], exists, fail, delay
        self.threads = set()
        hub = self

        class Api:
            def __init__(self, token=None):
                hub.tokens.append(token)

            def repo_exists(self, repo_id, repo_type=None):
                return hub.exists

            def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
                hub.calls.append(("create_repo", repo_id, repo_type, private))
                hub.exists = True

            def upload_file(self, repo_id, repo_type, path_or_fileobj, path_in_repo):
                hub._upload("upload_file", repo_id, repo_type, path_or_fileobj, path_in_repo, os.path.isfile)

            def upload_folder(self, repo_id, repo_type, folder_path, path_in_repo):
                hub._upload("upload_folder", repo_id, repo_type, folder_path, path_in_repo, os.path.isdir)

        self.Api = Api

    def _upload(self, kind, repo_id, repo_type, src, dest, exists):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail:
            raise ConnectionError("Failed to resolve 'huggingface.co'\nmore detail")
        assert exists(src), f"{src} was removed before its upload"  # never pruned while uploading
        self.calls.append((kind, repo_id, repo_type, dest, os.path.basename(src)))

    def uploads(self):
        return [c for c in self.calls if c[0] != "create_repo"]


@pytest.fixture
def fake_hub(monkeypatch):
    def make(**kw):
        hub = FakeHub(**kw)
        monkeypatch.setattr(hub_upload, "HfApi", hub.Api)
        return hub

    return make


def _run(tiny_sd, data, out, steps, *extra):
    return train_network.main(base_args(tiny_sd["sd1"]["safetensors"], data, out, steps, *extra))


def test_saved_models_are_uploaded_to_path_in_repo(tiny_sd, shapes_data, tmp_path, fake_hub):
    hub = fake_hub()
    out = tmp_path / "out"
    _run(tiny_sd, shapes_data, out, 4, "--save_every_n_steps", "2", *HUB)
    assert hub.calls == [
        ("create_repo", "me/repo", None, True),
        ("upload_file", "me/repo", None, "loras/lora-step00000002.safetensors", "lora-step00000002.safetensors"),
        ("upload_file", "me/repo", None, "loras/lora-step00000004.safetensors", "lora-step00000004.safetensors"),
        ("upload_file", "me/repo", None, "loras/lora.safetensors", "lora.safetensors"),
    ]
    assert set(hub.tokens) == {"hf_secret_token"}
    # the token reaches HfApi only: not the receipt, not the model metadata
    for receipt in out.glob("*.run.json"):
        text = receipt.read_text(encoding="utf-8")
        assert "hf_secret_token" not in text and "huggingface_token" not in json.loads(text)["config"]
        assert json.loads(text)["config"]["huggingface_repo_id"] == "me/repo"
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert "hf_secret_token" not in json.dumps(f.metadata())


def test_public_repo_type_and_existing_repo(tiny_sd, shapes_data, tmp_path, fake_hub):
    hub = fake_hub()
    _run(tiny_sd, shapes_data, tmp_path / "out", 1, "--huggingface_repo_id", "me/ds", "--huggingface_repo_type",
         "dataset", "--huggingface_repo_visibility", "public")
    # no path in repo: the file goes to the repository's root
    assert hub.calls == [("create_repo", "me/ds", "dataset", False),
                         ("upload_file", "me/ds", "dataset", "lora.safetensors", "lora.safetensors")]
    hub = fake_hub(exists=True)
    _run(tiny_sd, shapes_data, tmp_path / "out2", 1, "--huggingface_repo_id", "me/ds")
    assert hub.calls == [("upload_file", "me/ds", None, "lora.safetensors", "lora.safetensors")]


def test_async_upload_finishes_before_main_returns_and_before_pruning(tiny_sd, shapes_data, tmp_path, fake_hub):
    hub = fake_hub(delay=0.3)
    out = tmp_path / "out"
    _run(tiny_sd, shapes_data, out, 4, "--save_every_n_steps", "1", "--save_last_n_steps", "1", "--async_upload",
         *HUB)
    dests = [c[3] for c in hub.uploads()]
    assert dests == [f"loras/lora-step0000000{k}.safetensors" for k in (1, 2, 3, 4)] + ["loras/lora.safetensors"]
    assert any(name.startswith("hub-upload") for name in hub.threads)  # really in the background
    assert not (out / "lora-step00000001.safetensors").exists()  # pruned, after its upload
    assert not [t for t in threading.enumerate() if t.name.startswith("hub-upload")]


def test_state_folders_are_uploaded(tiny_sd, shapes_data, tmp_path, fake_hub):
    hub = fake_hub()
    _run(tiny_sd, shapes_data, tmp_path / "out", 2, "--save_every_n_steps", "2", "--save_state",
         "--save_state_to_huggingface", *HUB)
    assert [c[:4] for c in hub.uploads()] == [
        ("upload_file", "me/repo", None, "loras/lora-step00000002.safetensors"),
        ("upload_folder", "me/repo", None, "loras/lora-step00000002-state"),
        ("upload_file", "me/repo", None, "loras/lora.safetensors"),
        ("upload_folder", "me/repo", None, "loras/lora-state"),
    ]


def test_without_save_state_to_huggingface_states_stay_local(tiny_sd, shapes_data, tmp_path, fake_hub):
    hub = fake_hub()
    _run(tiny_sd, shapes_data, tmp_path / "out", 2, "--save_state", *HUB)
    assert [c[3] for c in hub.uploads()] == ["loras/lora.safetensors"]
    assert (tmp_path / "out" / "lora-state").is_dir()


def test_failed_upload_is_one_line_and_keeps_the_file(tiny_sd, shapes_data, tmp_path, fake_hub, caplog):
    fake_hub(fail=True)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        _run(tiny_sd, shapes_data, out, 1, *HUB)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "me/repo" in errors[0] and "lora.safetensors" in errors[0] and "kept" in errors[0]
    assert "ConnectionError" in errors[0] and "\n" not in errors[0] and "hf_secret_token" not in caplog.text
    assert (out / "lora.safetensors").is_file()  # and the run went on to the end


def test_resume_from_huggingface_continues_exactly(tiny_sd, shapes_data, tmp_path, fake_hub, monkeypatch):
    fake_hub()
    common = ["--save_every_n_steps", "2", "--save_state"]
    straight, resumed, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    _run(tiny_sd, shapes_data, straight, 4, *common)
    shutil.copytree(straight / "lora-step00000002-state", cache / "loras" / "lora-step00000002-state")
    asked = []

    def snapshot_download(**kw):
        asked.append(kw)
        return str(cache)

    monkeypatch.setattr(hub_upload, "snapshot_download", snapshot_download)
    _run(tiny_sd, shapes_data, resumed, 4, *common, "--resume_from_huggingface", "--resume",
         "me/repo/loras/lora-step00000002-state:main:model", "--huggingface_token", "hf_secret_token")
    assert asked == [dict(repo_id="me/repo", repo_type="model", revision="main",
                          allow_patterns=["loras/lora-step00000002-state/*"], token="hf_secret_token")]
    assert not (resumed / "lora-step00000002.safetensors").exists()  # started at step 2
    assert (resumed / "lora-step00000004.safetensors").exists()
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_huggingface_errors(tmp_path, monkeypatch):
    def offline(**kw):
        raise OSError("Cannot reach https://huggingface.co")

    monkeypatch.setattr(hub_upload, "snapshot_download", offline)
    with pytest.raises(UserError, match="cannot download st from hub repo me/repo"):
        hub_upload.download_state("me/repo/st")
    monkeypatch.setattr(hub_upload, "snapshot_download", lambda **kw: str(tmp_path))
    with pytest.raises(UserError, match="no files under st in hub repo me/repo"):
        hub_upload.download_state("me/repo/st")
    with pytest.raises(UserError, match="repo_id"):
        hub_upload.parse_hub_location("justaname")


@pytest.mark.parametrize("location, parsed", [
    ("me/repo/a/b-state", ("me/repo", "a/b-state", None, None)),
    ("me/repo/st:v1", ("me/repo", "st", "v1", "model")),
    ("me/repo/st:v1:dataset", ("me/repo", "st", "v1", "dataset")),
    ("me/repo:main:model", ("me/repo", "", "main", "model")),
])
def test_parse_hub_location(location, parsed):
    assert hub_upload.parse_hub_location(location) == parsed


def test_hub_options_without_repo_id_warn(caplog):
    import argparse

    from library.training.runners.checks import check_hub_options

    with caplog.at_level(logging.INFO):
        check_hub_options(argparse.Namespace(async_upload=True, huggingface_token="t"))
    assert "--async_upload has no effect without --huggingface_repo_id" in caplog.text
    assert "--huggingface_token is only used" in caplog.text


def test_train_db_diffusers_folder_and_ti_file_are_uploaded(tiny_sd, shapes_data, tmp_path, fake_hub):
    import train_db
    import train_textual_inversion
    from tests.training.full_train_helpers import common_args

    hub = fake_hub()
    train_db.main(common_args(tiny_sd["sd1"]["safetensors"], tmp_path / "db", 1, "--train_data_dir", str(shapes_data),
                              "--output_name", "db", "--save_model_as", "diffusers", *HUB))
    assert [c[:4] for c in hub.uploads()] == [("upload_folder", "me/repo", None, "loras/db")]
    hub = fake_hub(exists=True)
    train_textual_inversion.main(common_args(
        tiny_sd["sd1"]["safetensors"], tmp_path / "ti", 1, "--train_data_dir", str(shapes_data), "--token_string",
        "zqx", "--init_word", "shape", "--use_object_template", *HUB))
    assert [c[:4] for c in hub.uploads()] == [("upload_file", "me/repo", None, "loras/zqx.pt")]


def test_no_hub_uploader_without_repo_id(monkeypatch):
    """Without --huggingface_repo_id the checkpointer never touches the hub module (nor huggingface_hub)."""
    import types

    from library.training.loop.checkpointing import Checkpointer
    from library.training.settings import HubSettings, SaveSettings

    def refuse(hub):
        raise AssertionError("HubUploader.from_settings called without --huggingface_repo_id")

    monkeypatch.setattr(hub_upload.HubUploader, "from_settings", classmethod(lambda cls, hub: refuse(hub)))
    hub = HubSettings(token="t", async_upload=True)
    checkpointer = Checkpointer(SaveSettings(output_dir="out"), types.SimpleNamespace(is_main_process=True),
                                lambda *a: None, ".safetensors", 1, hub=hub)
    assert checkpointer.hub is None
    checkpointer.finish()
