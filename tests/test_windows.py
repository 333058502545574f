import numpy as np
import pytest

from magic_demo.windows import (FrameAssembler, derive_window_seed, fit_frames, match_colours, plan_windows,
                                transfer_colour_moments)


@pytest.mark.parametrize("total,window,overlap", [(1, 9, 0), (9, 9, 0), (10, 9, 0), (40, 9, 2), (480, 33, 0),
                                                  (481, 33, 5), (100, 13, 11)])
def test_windows_cover_the_timeline(total, window, overlap):
    plans = plan_windows(total, window, overlap, temporal_ratio=4)
    assert plans[0].start == 0 and plans[-1].end >= total
    for prev, nxt in zip(plans, plans[1:]):
        assert nxt.start == prev.end - 1 - overlap  # conditioned on a frame of the previous window
    for p in plans:
        assert (p.num_frames - 1) % 4 == 0 and p.num_frames <= window
    # the last window is no longer than needed
    assert plans[-1].end - total < 4


def test_sixty_seconds_at_8_fps_is_15_windows_of_33():
    plans = plan_windows(480, 33, 0, 4)
    assert len(plans) == 15 and all(p.num_frames == 33 for p in plans)


def test_fit_frames():
    assert [fit_frames(n, 4) for n in (1, 2, 5, 6, 9)] == [1, 5, 5, 9, 9]
    assert fit_frames(7, 1) == 7


@pytest.mark.parametrize("kwargs,name", [(dict(total_frames=0, window_frames=9), "total_frames"),
                                         (dict(total_frames=9, window_frames=8), "window_frames"),
                                         (dict(total_frames=9, window_frames=9, overlap=8), "overlap")])
def test_bad_plans_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        plan_windows(**kwargs)


@pytest.mark.parametrize("total,window,overlap", [(40, 9, 2), (23, 9, 0), (5, 9, 3), (100, 13, 4)])
def test_assembler_emits_each_timeline_frame_once(total, window, overlap):
    plans = plan_windows(total, window, overlap, 4)
    asm = FrameAssembler(total, overlap)
    out = []
    for p in plans:
        # every window paints its timeline index, so the output must be 0, 1, 2, ... (blends of equal values)
        frames = np.broadcast_to(np.arange(p.start, p.end, dtype=np.uint8)[:, None, None, None], (p.num_frames, 2, 2, 3))
        out.append(asm.add(p, frames, last=p is plans[-1]))
    video = np.concatenate(out)
    assert len(video) == total
    assert (video[:, 0, 0, 0] == np.arange(total)).all()


def test_cross_fade_blends_old_into_new():
    plans = plan_windows(13, 9, 2, 4)  # window 2 starts at frame 6, frames 7 and 8 are cross-faded
    asm = FrameAssembler(13, 2)
    first = asm.add(plans[0], np.zeros((9, 1, 1, 3), np.uint8), last=False)
    second = asm.add(plans[1], np.full((plans[1].num_frames, 1, 1, 3), 90, np.uint8), last=True)
    assert len(first) == 7
    assert second[:2, 0, 0, 0].tolist() == [30, 60]  # 1/3 and 2/3 of the way to the new window
    assert (second[2:] == 90).all() and len(first) + len(second) == 13


def test_window_seeds_are_reproducible_and_distinct():
    seeds = [derive_window_seed(42, k) for k in range(20)]
    assert seeds == [derive_window_seed(42, k) for k in range(20)]
    assert len(set(seeds)) == 20 and all(0 <= s < 2**63 for s in seeds)
    assert derive_window_seed(43, 0) != seeds[0]


def _square(colour, x, bg=(0, 0, 40), size=32, side=8):
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = bg
    img[10:10 + side, x:x + side] = colour
    return img


def test_match_colours_restores_a_drifted_hue_and_keeps_the_layout():
    reference = _square((200, 40, 40), x=4)  # red square, first frame
    drifted = _square((60, 60, 200), x=16)  # same square later, moved and drifted to blue
    out = match_colours(drifted, reference)
    inside = np.zeros((32, 32), bool)
    inside[10:18, 16:24] = True
    assert np.array_equal(out[inside], np.tile([200, 40, 40], (64, 1)))  # the shape is red again, where it is now
    assert np.array_equal(out[~inside], np.tile([0, 0, 40], (1024 - 64, 1)))  # the background stays flat
    assert np.array_equal(match_colours(reference, reference), reference)
    assert out.dtype == np.uint8 and out.shape == drifted.shape


def test_match_colours_undoes_a_hue_shift_that_reverses_a_channels_order():
    # orange on dark green drifted to red: in the green channel the shape went from above the background (165 > 100)
    # to below it (0 < 100); matching channel by channel would hand the shape the background's green
    reference = _square((255, 165, 0), x=4, bg=(0, 100, 0))
    drifted = _square((255, 0, 0), x=16, bg=(0, 100, 0))
    inside = np.zeros((32, 32), bool)
    inside[10:18, 16:24] = True
    out = match_colours(drifted, reference)
    assert np.array_equal(out[inside], np.tile([255, 165, 0], (64, 1)))
    assert np.array_equal(out[~inside], np.tile([0, 100, 0], (1024 - 64, 1)))
    moments = transfer_colour_moments(drifted, reference)  # the linear stage alone already puts it near orange
    assert np.abs(moments[inside].astype(int) - [255, 165, 0]).max() < 40


def test_match_colours_maps_only_to_values_the_reference_has():
    reference = _square((200, 40, 40), x=4)  # flat: two colours
    rng = np.random.default_rng(0)
    noisy = _square((150, 60, 90), x=16).astype(int) + rng.integers(-20, 21, (32, 32, 3))  # drifted, grainy
    out = match_colours(np.clip(noisy, 0, 255).astype(np.uint8), reference)
    inside = np.zeros((32, 32), bool)
    inside[10:18, 16:24] = True
    # every shape pixel is the reference's red, every other pixel its background: no in-between values
    assert np.array_equal(out[inside], np.tile([200, 40, 40], (64, 1)))
    assert np.array_equal(out[~inside], np.tile([0, 0, 40], (1024 - 64, 1)))
