"""Output naming, save conditions and pruning, worked by hand from spec file-formats §(e)."""
import pytest

from library.training.loop import output_names as on


@pytest.mark.parametrize("func, args, expected", [
    (on.epoch_name, ("mylora", 1), "mylora-000001"),
    (on.epoch_name, (None, 12), "epoch-000012"),
    (on.step_name, ("mylora", 100), "mylora-step00000100"),
    (on.step_name, (None, 5), "at-step00000005"),
    (on.last_name, ("mylora",), "mylora"),
    (on.last_name, (None,), "last"),
    (on.epoch_state_name, ("mylora", 3), "mylora-000003-state"),
    (on.epoch_state_name, (None, 3), "epoch-000003-state"),
    (on.step_state_name, ("mylora", 200), "mylora-step00000200-state"),
    (on.step_state_name, (None, 200), "at-step00000200-state"),
    (on.last_state_name, ("mylora",), "mylora-state"),
    (on.last_state_name, (None,), "last-state"),
    (on.epoch_name, ("", 1), "-000001"),  # upstream's default_if_none keeps an empty name
])
def test_names(func, args, expected):
    assert func(*args) == expected


def test_extension():
    assert on.epoch_name("x", 2) + on.model_extension("safetensors") == "x-000002.safetensors"
    assert on.model_extension("pt") == ".pt"


# (completed epochs, save_every_n_epochs, num_epochs) -> save?
@pytest.mark.parametrize("epoch, every, num, expected", [
    (1, 1, 3, True), (2, 1, 3, True), (3, 1, 3, False),  # the last epoch is the final save, not an epoch save
    (1, 2, 6, False), (2, 2, 6, True), (4, 2, 6, True), (6, 2, 6, False),
    (1, None, 3, False),
])
def test_should_save_epoch(epoch, every, num, expected):
    assert on.should_save_epoch(epoch, every, num) is expected


@pytest.mark.parametrize("step, every, expected", [(100, 100, True), (150, 100, False), (300, 100, True),
                                                   (7, None, False)])
def test_should_save_step(step, every, expected):
    assert on.should_save_step(step, every) is expected


# e - every * keep, kept when >= 0
@pytest.mark.parametrize("epoch, every, keep, expected", [
    (5, 1, 2, 3), (6, 2, 2, 2), (4, 2, 2, 0), (2, 2, 2, None), (3, 1, None, None), (3, None, 2, None),
])
def test_epoch_to_remove(epoch, every, keep, expected):
    assert on.epoch_to_remove(epoch, every, keep) == expected


def test_epoch_state_override():
    # states use save_last_n_epochs_state when set ...
    assert on.epoch_to_remove(6, 1, 4, state=True, save_last_n_epochs_state=2) == 4
    # ... the model files ignore it
    assert on.epoch_to_remove(6, 1, 4, save_last_n_epochs_state=2) == 2
    # unset (or 0, upstream's truthiness test) falls back to save_last_n_epochs
    assert on.epoch_to_remove(6, 1, 4, state=True) == 2
    assert on.epoch_to_remove(6, 1, 4, state=True, save_last_n_epochs_state=0) == 2
    assert on.epoch_to_remove(6, 1, None, state=True, save_last_n_epochs_state=3) == 3


# r = s - keep - 1; r -= r % every; removed if r >= 0
@pytest.mark.parametrize("step, every, keep, expected", [
    (500, 100, 300, 100),  # r = 199 -> 100
    (400, 100, 300, 0),    # r = 99 -> 0: model step 0 "removed" (no such file; r >= 0 rule)
    (300, 100, 300, None),  # r = -1 -> -100
    (50, 10, 30, 10),      # upstream's comment example: keep 30 steps at step 50, remove step 10
    (60, 10, 30, 20),
    (550, 50, 120, 400),   # r = 429 -> 400
    (500, 100, None, None),
])
def test_step_to_remove(step, every, keep, expected):
    assert on.step_to_remove(step, every, keep) == expected


def test_step_state_rules():
    # states: removed only if r > 0
    assert on.step_to_remove(400, 100, 300, state=True) is None
    assert on.step_to_remove(500, 100, 300, state=True) == 100
    # save_last_n_steps_state overrides for states only: r = 500 - 100 - 1 = 399 -> 300
    assert on.step_to_remove(500, 100, 300, state=True, save_last_n_steps_state=100) == 300
    assert on.step_to_remove(500, 100, 300, save_last_n_steps_state=100) == 100
    assert on.step_to_remove(500, 100, None, state=True, save_last_n_steps_state=200) == 200  # r = 299 -> 200


@pytest.mark.parametrize("num_epochs, ratio, every, expected", [
    (10, 3, None, 3),   # floor(10/3)
    (10, 4, 7, 2),      # the ratio overrides save_every_n_epochs
    (2, 5, None, 1),    # floor(2/5) = 0 -> 1
    (10, None, 4, 4),
    (10, 0, 4, 4),      # ratio must be > 0 to apply
])
def test_save_n_epoch_ratio(num_epochs, ratio, every, expected):
    assert on.save_every_n_epochs_from_ratio(num_epochs, ratio, every) == expected
