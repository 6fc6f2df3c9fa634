"""What stays unsupported is refused with one line naming it (issue 21 item 6)."""
import json
import subprocess
import sys
from pathlib import Path

from tools import detect_face_rotate

ROOT = Path(__file__).resolve().parents[2]


def test_xti_trainer_refuses_in_one_line():
    done = subprocess.run([sys.executable, str(ROOT / "train_textual_inversion_XTI.py"), "--foo", "1"],
                          capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error: train_textual_inversion_XTI.py") and "not supported" in lines[0]


def test_nai_hypernetwork_module_is_named(tmp_path):
    from library.errors import UserError
    from networks.network_host import import_network_module

    try:
        import_network_module("finetune.hypernetwork_nai")
    except UserError as e:
        assert "--network_module finetune.hypernetwork_nai" in str(e)
    else:
        raise AssertionError("finetune.hypernetwork_nai imported")


def test_detect_face_rotate_parses_upstream_options_then_refuses():
    upstream = json.loads((ROOT / "library" / "config" / "sd_scripts_options.json").read_text(encoding="utf-8"))
    ours = {a.dest for a in detect_face_rotate.setup_parser()._actions} - {"help"}
    assert ours == set(upstream["scripts"]["tools/detect_face_rotate"])
    argv = ["--src_dir", "in", "--dst_dir", "out", "--rotate", "--crop_size", "512,512", "--min_size", "64",
            "--max_size", "1024", "--multiple_faces", "--debug"]
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "detect_face_rotate.py"), *argv],
                          capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1
    for needed in ("anime_face_detector", "mmdet_anime-face_yolov3.pth", "mmpose_anime-face_hrnetv2.pth"):
        assert needed in lines[0]
    # an option upstream does not have is argparse's own error, before the refusal
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "detect_face_rotate.py"), "--no_such_option"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unrecognized arguments: --no_such_option" in bad.stderr
