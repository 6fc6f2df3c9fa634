"""What stays unsupported is refused with one line naming it (issue 21 item 6)."""
import subprocess
import sys
from pathlib import Path

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
