"""sd-scripts' ``BucketManager`` interface on top of ``library.data.buckets`` (wrappers use it to count steps).

Same constructor, methods and return values as upstream: ``make_buckets()``, ``set_predefined_resos``,
``select_bucket(w, h) -> (bucket, resized_size, ar_error)`` (which registers the bucket), ``add_image``,
``sort``, ``shuffle``, and the ``resos`` / ``buckets`` / ``reso_to_id`` attributes.
"""
from __future__ import annotations

import random
from typing import Any, Optional, Sequence

from library.data.buckets import Reso, make_bucket_resolutions, select_no_upscale, select_predefined


class BucketManager:
    def __init__(self, no_upscale: bool, max_reso: Optional[Reso], min_size: Optional[int],
                 max_size: Optional[int], reso_steps: int) -> None:
        if max_size is not None:
            if max_reso is not None and max_size < max(max_reso):
                raise ValueError("the max_size should be larger than the width and height of max_reso")
            if min_size is not None and max_size < min_size:
                raise ValueError("the max_size should be larger than the min_size")
        self.no_upscale = no_upscale
        self.max_reso = tuple(max_reso) if max_reso is not None else None
        self.max_area = max_reso[0] * max_reso[1] if max_reso is not None else None
        self.min_size, self.max_size, self.reso_steps = min_size, max_size, reso_steps
        self.predefined_resos: list[Reso] = []
        self.resos: list[Reso] = []
        self.reso_to_id: dict[Reso, int] = {}
        self.buckets: list[list[Any]] = []

    def make_buckets(self) -> None:
        self.set_predefined_resos(make_bucket_resolutions(self.max_reso, self.min_size, self.max_size,
                                                          self.reso_steps))

    def set_predefined_resos(self, resos: Sequence[Reso]) -> None:
        self.predefined_resos = [tuple(r) for r in resos]

    def add_if_new_reso(self, reso: Reso) -> None:
        if reso not in self.reso_to_id:
            self.reso_to_id[reso] = len(self.resos)
            self.resos.append(reso)
            self.buckets.append([])

    def select_bucket(self, image_width: int, image_height: int) -> tuple[Reso, Reso, float]:
        size = (image_width, image_height)
        if self.no_upscale:
            choice = select_no_upscale(size, self.max_area, self.reso_steps)
        else:
            choice = select_predefined(size, self.predefined_resos)
        self.add_if_new_reso(choice.bucket)
        return choice.bucket, choice.resized, choice.ar_error

    def add_image(self, reso: Reso, image_or_info: Any) -> None:
        self.buckets[self.reso_to_id[reso]].append(image_or_info)

    def shuffle(self) -> None:
        for bucket in self.buckets:
            random.shuffle(bucket)

    def sort(self) -> None:
        order = sorted(range(len(self.resos)), key=lambda i: self.resos[i])
        self.resos = [self.resos[i] for i in order]
        self.buckets = [self.buckets[i] for i in order]
        self.reso_to_id = {reso: i for i, reso in enumerate(self.resos)}
