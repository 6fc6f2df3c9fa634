#!/usr/bin/env python
"""sd-scripts v0.8.7's Extended Textual Inversion (XTI) trainer is not provided: this script says so and exits 2.

XTI trains one embedding per U-Net cross-attention layer and feeds them through a patched U-Net forward
(upstream's ``XTI_hijack.py``); its files only work with that patch. docs/compatibility.md lists it with the
other options that stay unsupported. Plain Textual Inversion: ``train_textual_inversion.py``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.errors import UserError, exit_on_user_error  # noqa: E402

MESSAGE = ("train_textual_inversion_XTI.py (Extended Textual Inversion) is not supported: its per-layer embeddings "
           "need sd-scripts' patched U-Net; train a plain embedding with train_textual_inversion.py "
           "(see docs/compatibility.md)")


@exit_on_user_error
def main(argv=None) -> None:
    raise UserError(MESSAGE)


if __name__ == "__main__":
    main()
