"""gen_img's "prompts" bar advances only after a batch's images are written (it used to reach 100 % when the
last line was read, while its batch was still sampling). Oracle: the PNG files on disk at each update."""
from __future__ import annotations

import pytest

import library.sampling.gen_runner as gen_runner
from tools.make_tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> str:
    return str(write_tiny_model("sd1", tmp_path_factory.mktemp("progress"), formats=("safetensors",))["safetensors"])


class Recorder:
    """A stand-in for tqdm that notes, at every update, the position and the images already written."""

    outdir = None
    events: list[tuple[int, int]] = []
    totals: list[int] = []

    def __init__(self, iterable=None, total=None, **kwargs):
        self.iterable, self.n = iterable, 0
        Recorder.totals.append(total)

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.n += n
        Recorder.events.append((self.n, len(list(Recorder.outdir.glob("*.png")))))


@pytest.mark.parametrize("batch_size, images_per_prompt, expected", [
    (1, 1, [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6)]),  # 3 lines x 2 iterations
    (2, 1, [(2, 2), (3, 3), (5, 5), (6, 6)]),                  # lines 1+2 share a batch, line 3 alone
    (2, 3, [(1, 4), (2, 6), (3, 9), (4, 13), (5, 15), (6, 18)]),  # a line completes in a later batch
])
def test_bar_advances_after_images_are_written(sd1, tmp_path, monkeypatch, batch_size, images_per_prompt,
                                               expected):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na bird\n", encoding="utf-8")
    out = tmp_path / "out"
    Recorder.outdir, Recorder.events, Recorder.totals = out, [], []
    monkeypatch.setattr(gen_runner, "tqdm", Recorder)
    paths = gen_runner.run(_args(sd1, out, prompts, batch_size, images_per_prompt))
    assert Recorder.totals == [6]
    assert Recorder.events == expected
    assert len(paths) == 6 * images_per_prompt


def _args(ckpt, out, prompts, batch_size, images_per_prompt):
    from library.sampling.gen_options import build_gen_parser

    return build_gen_parser().parse_args(["--ckpt", ckpt, "--outdir", str(out), "--W", "64", "--H", "64", "--steps",
                                          "1", "--from_file", str(prompts), "--n_iter", "2", "--batch_size",
                                          str(batch_size), "--images_per_prompt", str(images_per_prompt),
                                          "--sequential_file_name"])
