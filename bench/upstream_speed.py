#!/usr/bin/env python
"""``../shared/upstream-bench/bench_speed.py`` at any resolution: the harness's option sets keep
``--max_bucket_reso 128``, which both tools refuse above 128 px; this raises it to twice the resolution for both
tools alike, then runs the harness unchanged (same arguments).

    .venv/bin/python bench/upstream_speed.py --repeats 2 --short 2 --long 6 --threads 1 --resolution 256
"""
from __future__ import annotations

import sys
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[2] / "shared" / "upstream-bench"
sys.path.insert(0, str(HARNESS))

import bench_speed  # noqa: E402
import kohya_oracle  # noqa: E402


def with_bucket_limit(options: list[str], resolution: int) -> list[str]:
    """``options`` with ``--max_bucket_reso`` (when given) raised to twice ``resolution``, at least 128."""
    if "--max_bucket_reso" in options:
        options[options.index("--max_bucket_reso") + 1] = str(max(128, 2 * resolution))
    return options


def _resolution(argv: list[str]) -> int:
    return int(argv[argv.index("--resolution") + 1]) if "--resolution" in argv else 64


def main() -> None:
    resolution = _resolution(sys.argv)
    original = kohya_oracle.run_options

    def run_options(name, **paths):
        options, out_name = original(name, **paths)
        return with_bucket_limit(list(options), resolution), out_name

    kohya_oracle.run_options = run_options
    bench_speed.main()


if __name__ == "__main__":
    main()
