"""Behaviour unchanged (issue 17 item 6): every trainer's fixed-seed 3-step run saves the tensors the code
produced when tests/golden/golden.json was written (``python -m tests.golden.cases``, before a refactor).

The file holds one record per machine kind it was run on (torch build, CPU model, cache and the ISA flags that pick
oneDNN kernels: an Intel Xeon with AVX-512 / AMX and an AMD EPYC with AVX2 so far). On a recorded kind the tensors
must be bit for bit the same and the metadata identical. Elsewhere CPU kernels round differently and Adam turns
that rounding into whole steps for near-zero gradients, so there the shapes, dtypes and tensor-free metadata must
match and the median relative difference of the per-tensor absolute sums must stay under ``cases.AGREEMENT``
(measured between the two kinds and against real changes, see ``cases.agreement``).
"""
import json

import pytest

from tests.golden import cases

RUNS = json.loads(cases.GOLDEN.read_text(encoding="utf-8"))["runs"]
HERE = cases.machine()
SAME = [r for r in RUNS if r["machine"] == HERE]


def _tensor_free(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if "hash" not in k}


@pytest.mark.parametrize("name", cases.NAMES)
def test_trainer_output_is_unchanged(name, tmp_path):
    got = cases.run_case(name, tmp_path)
    got_meta = got.pop("__metadata__")
    for run in SAME or RUNS:
        want = dict(run["cases"][name])
        want_meta = want.pop("__metadata__")
        assert got.keys() == want.keys()
        if SAME:
            assert got_meta == want_meta
            changed = [k for k in want if got[k] != want[k]]
            assert not changed, f"{len(changed)} tensors differ from the golden run, first: {changed[:3]}"
            continue
        assert _tensor_free(got_meta) == _tensor_free(want_meta)
        for k, (_, dtype, shape, _, _) in want.items():
            assert got[k][1:3] == [dtype, shape], k
        a = cases.agreement(got, want)
        assert a <= cases.AGREEMENT, f"median difference {a:.2g} from the {run['machine']['model']} record"


def test_the_records_agree_with_each_other():
    """The records of different machine kinds are of the same code (``--add`` checks this when it writes)."""
    assert len({json.dumps(r["machine"], sort_keys=True) for r in RUNS}) == len(RUNS)
    for a in RUNS[1:]:
        for name in cases.NAMES:
            assert cases.agreement(a["cases"][name], RUNS[0]["cases"][name]) <= cases.AGREEMENT / 4, name
