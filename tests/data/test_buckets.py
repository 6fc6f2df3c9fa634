"""Bucket formulas of spec dataset-config §7, with expectations worked out by hand."""
import pytest

from library.data.buckets import (
    BucketSet,
    crop_top_left,
    get_crop_ltrb,
    make_bucket_resolutions,
    round_to_steps,
    select_no_upscale,
    select_predefined,
)
from library.errors import UserError

SPEC_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
            (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
            (896, 256), (960, 256), (1024, 256)]


def test_spec_example_512_gives_17_buckets():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == SPEC_512


def test_buckets_rule_on_a_non_square_resolution():
    # A = 640*384 = 245760; square: floor(sqrt(245760)=495.7 / 64) = 7 -> 448
    # w=256: A//256 = 960 -> 960//64*64 = 960 -> min(1024, 960) = 960 -> (256,960),(960,256)
    # w=512: A//512 = 480 -> 448 -> (512,448),(448,512)
    resos = make_bucket_resolutions((640, 384), 256, 1024, 64)
    assert (448, 448) in resos
    assert {(256, 960), (960, 256), (512, 448), (448, 512)} <= set(resos)
    assert resos == sorted(resos)


@pytest.mark.parametrize("size, bucket, resized, err", [
    # exact bucket size: chosen as is
    ((512, 512), (512, 512), (512, 512), 0.0),
    # 1024x768, ar 1.3333: |576/448 - ar| = |1.2857 - 1.3333| = 0.0476 is the least;
    # ar > 1.2857 so s = 448/768 = 0.58333: w = int(597.33 + 0.5) = 597, h = int(448 + 0.5) = 448
    ((1024, 768), (576, 448), (597, 448), 576 / 448 - 1024 / 768),
    # 300x1000, ar 0.3: |256/832 - 0.3| = 0.0077 beats |256/896 - 0.3| = 0.0143;
    # ar < 0.3077 so s = 256/300: w = 256, h = int(853.33 + 0.5) = 853
    ((300, 1000), (256, 832), (256, 853), 256 / 832 - 0.3),
    # 2000x500, ar 4: 1024/256 = 4 exactly -> (1024, 256); s = 256/500 = 0.512 -> (1024, 256)
    ((2000, 500), (1024, 256), (1024, 256), 0.0),
    # 100x100 upscaled: (512, 512), s = 5.12 -> (512, 512)
    ((100, 100), (512, 512), (512, 512), 0.0),
])
def test_predefined_assignment(size, bucket, resized, err):
    choice = select_predefined(size, SPEC_512)
    assert choice.bucket == bucket
    assert choice.resized == resized
    assert choice.ar_error == pytest.approx(err)


def test_tie_takes_first_in_sorted_order():
    # ar 1.25: |0.5 - 1.25| = |2 - 1.25| = 0.75 -> (256, 512) comes first;
    # ar > 0.5 so s = 512/400 = 1.28 -> (640, 512)
    choice = select_predefined((500, 400), [(256, 512), (512, 256)])
    assert choice.bucket == (256, 512)
    assert choice.resized == (640, 512)


def test_exact_size_wins_over_same_aspect_earlier_bucket():
    # both buckets have ar 2/3; argmin alone would pick (512, 768)
    assert select_predefined((640, 960), [(512, 768), (640, 960)]).bucket == (640, 960)
    assert select_predefined((320, 480), [(512, 768), (640, 960)]).bucket == (512, 768)


def test_round_to_steps():
    assert round_to_steps(724.077, 64) == 704  # int(724.577) = 724; 724 - 20
    assert round_to_steps(63.4, 64) == 0
    assert round_to_steps(127.5, 64) == 128  # int(128.0) = 128


@pytest.mark.parametrize("size, bucket, resized", [
    # area <= 512*512: no resize; 300 - 300%64 = 256, 200 - 200%64 = 192
    ((300, 200), (256, 192), (300, 200)),
    # 1024x1024: rw = rh = 512, both candidates 512x512 with error 0 -> candidate 2
    ((1024, 1024), (512, 512), (512, 512)),
    # 2000x1000, ar 2: rw = sqrt(524288) = 724.08, rh = 362.04
    # c1: bw = 704, bh = round(352) = 320 -> 2.2 (err 0.2); c2: bh = 320, bw = round(640) = 640 -> err 0
    # c2: resized = (int(640 + 0.5), 320) = (640, 320)
    ((2000, 1000), (640, 320), (640, 320)),
    # 1200x1000, ar 1.2: rw = 560.87, rh = 467.39
    # c1: bw = 512, bh = round(426.67) = 384 -> 1.333 (err 0.133)
    # c2: bh = 448, bw = round(537.6) = 512 -> 1.1429 (err 0.0571) -> c2 wins
    # resized = (int(537.6 + 0.5), 448) = (538, 448); bucket (538 - 26, 448) = (512, 448)
    ((1200, 1000), (512, 448), (538, 448)),
    # 1000x1200, ar 0.8333: rw = 467.39, rh = 560.87
    # c1: bw = 448, bh = round(537.6) = 512 -> 0.875 (err 0.0417)
    # c2: bh = 512, bw = round(426.67) = 384 -> 0.75 (err 0.0833) -> c1 wins
    # resized = (448, int(537.6 + 0.5)) = (448, 538); bucket (448, 538 - 26) = (448, 512)
    ((1000, 1200), (448, 512), (448, 538)),
])
def test_no_upscale(size, bucket, resized):
    choice = select_no_upscale(size, 512 * 512, 64)
    assert (choice.bucket, choice.resized) == (bucket, resized)
    assert choice.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


def test_no_upscale_too_small_is_a_user_error():
    with pytest.raises(UserError, match="50x50"):
        select_no_upscale((50, 50), 512 * 512, 64)


def test_crop_ltrb_fit_inside():
    # bucket (576,448) ar 1.2857 < image ar 1.3333: rw = 576, rh = 576 / 1.3333 = 432
    # left = 0, top = (448 - 432) // 2 = 8, right = 576, bottom = 440
    assert get_crop_ltrb((576, 448), (1024, 768)) == pytest.approx((0, 8, 576, 440))
    # bucket (256,832) ar 0.3077 > image ar 0.3: rw = 832 * 0.3 = 249.6, rh = 832
    # left = 6.4 // 2 = 3.0, top = 0, right = 252.6, bottom = 832
    ltrb = get_crop_ltrb((256, 832), (300, 1000))
    assert ltrb == pytest.approx((3.0, 0, 252.6, 832))
    assert crop_top_left(ltrb, 256, flipped=False) == (0, 3)
    # flipped: left = 256 - 252.6 = 3.4 -> int 3
    assert crop_top_left(ltrb, 256, flipped=True) == (0, 3)
    assert crop_top_left((10, 5, 100, 50), 128, flipped=True) == (5, 28)


def test_bucket_set_info_counts_repeats_and_sorts():
    buckets = BucketSet((512, 512), min_size=256, max_size=1024, steps=64)
    buckets.add_image("wide", (1024, 768), num_repeats=3)  # -> (576, 448)
    buckets.add_image("square", (512, 512), num_repeats=2)  # -> (512, 512)
    buckets.add_image("tall", (300, 1000))  # -> (256, 832)
    info = buckets.bucket_info()
    assert info["buckets"] == {0: {"resolution": (256, 832), "count": 1},
                               1: {"resolution": (512, 512), "count": 2},
                               2: {"resolution": (576, 448), "count": 3}}
    # mean of |errors| without repeats
    expected = (abs(576 / 448 - 4 / 3) + 0 + abs(256 / 832 - 0.3)) / 3
    assert info["mean_img_ar_error"] == pytest.approx(expected)
    assert buckets.buckets[2] == ["wide"] * 3


def test_bucket_set_without_bucketing_has_one_bucket():
    buckets = BucketSet((512, 512), enable_bucket=False)
    choice = buckets.add_image("a", (1024, 768))
    # cover-scaling to 512x512: ar 1.333 > 1 -> s = 512/768 -> (int(682.67 + 0.5), 512) = (683, 512)
    assert (choice.bucket, choice.resized) == ((512, 512), (683, 512))
    assert buckets.resos == [(512, 512)]


def test_bucket_set_no_upscale_names_the_image():
    buckets = BucketSet((512, 512), no_upscale=True)
    assert buckets.add_image("a", (300, 200)).bucket == (256, 192)
    with pytest.raises(UserError, match="tiny.png"):
        buckets.add_image("tiny.png", (30, 30))


def test_bucket_set_from_train_resolutions():
    buckets = BucketSet.from_resolutions([(640, 960), (512, 768), (768, 512)])
    assert buckets.add_image("k", (640, 960)).bucket == (640, 960)
    assert buckets.add_image("k2", (1000, 700)).bucket == (768, 512)
