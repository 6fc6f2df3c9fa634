"""Behaviour unchanged (issue 17 item 6): every trainer's fixed-seed 3-step run saves the tensors the code
produced when tests/golden/golden.json was written (``python -m tests.golden.cases``, before a refactor).

On the machine kind the file was written on (same torch build and CPU kernels, recorded in it) the tensors
must be bit for bit the same, and the metadata identical. Elsewhere CPU kernels may round differently, so
there the per-tensor sums must agree to 1e-5 (relative) and only metadata that does not hash the tensors
is compared.
"""
import json

import pytest

from tests.golden import cases

GOLDEN = json.loads(cases.GOLDEN.read_text(encoding="utf-8"))
SAME_MACHINE = GOLDEN["machine"] == cases.machine()


def _tensor_free(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if "hash" not in k}


@pytest.mark.parametrize("name", cases.NAMES)
def test_trainer_output_is_unchanged(name, tmp_path):
    want = dict(GOLDEN["cases"][name])
    got = cases.run_case(name, tmp_path)
    want_meta, got_meta = want.pop("__metadata__"), got.pop("__metadata__")
    assert got.keys() == want.keys()
    if SAME_MACHINE:
        assert got_meta == want_meta
        changed = [k for k in want if got[k] != want[k]]
        assert not changed, f"{len(changed)} tensors differ from the golden run, first: {changed[:3]}"
        return
    assert _tensor_free(got_meta) == _tensor_free(want_meta)
    for k, (_, dtype, shape, total, abs_total) in want.items():
        assert got[k][1:3] == [dtype, shape], k
        assert got[k][3] == pytest.approx(total, rel=1e-5, abs=1e-6 * max(abs_total, 1.0)), k
        assert got[k][4] == pytest.approx(abs_total, rel=1e-5), k
