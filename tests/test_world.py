import numpy as np
import pytest

from magic_demo import world


def test_caption_round_trip_and_articles():
    for seed in range(200):
        spec = world.sample_spec(seed)
        cap = world.caption(spec)
        parsed = world.parse_caption(cap)
        assert parsed == {"shape": spec.shape, "colour": spec.colour, "motion": spec.motion,
                          "background": spec.background}
        article = cap.split()[0]
        assert article == ("an" if spec.colour in ("orange",) else "a")
    spec = world.ClipSpec("circle", "orange", "moves left", "dark green")
    assert world.caption(spec) == "an orange circle moves left on a dark green background"
    assert world.parse_caption("  A Red  Square stays still on a navy background. ")["colour"] == "red"


@pytest.mark.parametrize("bad", ["a pink circle moves left on a black background",
                                 "a red circle moves left", "a red hexagon stays still on a gray background", ""])
def test_parse_caption_rejects(bad):
    with pytest.raises(ValueError, match="not a world caption"):
        world.parse_caption(bad)


def test_deterministic_by_seed():
    a = world.sample_clip(7, 9)
    b = world.sample_clip(7, 9)
    c = world.sample_clip(8, 9)
    assert a[1] == b[1] and np.array_equal(a[2], b[2])
    assert not np.array_equal(a[2], c[2])
    clip = a[2]
    assert clip.dtype == np.uint8 and clip.shape == (9, 64, 64, 3)
    assert world.render_clip(a[0], 3, size=32, fps=4).shape == (3, 32, 32, 3)
    assert np.array_equal(world.render_first_frame(a[0]), clip[0])
    # anti-aliased: edge pixels lie between background and shape colour
    assert len(np.unique(clip[0].reshape(-1, 3), axis=0)) > 3


def test_motion_direction_colour_and_shape_are_recovered():
    for seed in range(60):
        spec, cap, clip = world.sample_clip(seed, 17)
        a = world.analyse_clip(clip)
        assert a["motion"] == spec.motion, cap
        assert a["colour"] == spec.colour, cap
        assert a["shape"] == spec.shape, cap
        assert all(a["present"])


def test_bounce_keeps_shape_inside():
    for motion in ("moves left", "moves right", "moves up", "moves down"):
        spec = world.ClipSpec("square", "white", motion, "black", radius=0.15, x0=0.5, y0=0.5, speed=0.25)
        clip = world.render_clip(spec, 80)  # 10 s: several bounces
        for f in clip:
            d = world.find_shape(f, background=spec.bg_rgb)
            assert d["area"] > 0.8 * (2 * 0.9 * 0.15 * 64) ** 2  # never cut by the frame edge
        traj = world.trajectory(spec, 80)
        assert traj.min() >= spec.radius - 1e-9 and traj.max() <= 1 - spec.radius + 1e-9
        axis = 0 if "left" in motion or "right" in motion else 1
        steps = np.sign(np.diff(traj[:, axis]))
        assert (steps > 0).any() and (steps < 0).any()  # it came back


def _first_bounce_s(spec, fps=8, seconds=4):
    """Seconds until the shape's motion along its captioned axis first reverses (None: it never does)."""
    axis = 0 if spec.motion in ("moves left", "moves right") else 1
    steps = np.diff(world.trajectory(spec, fps * seconds, fps)[:, axis])
    sign = world.MOTIONS[spec.motion][axis]
    turned = np.flatnonzero(np.sign(steps) != sign)
    return turned[0] / fps if len(turned) else None


def test_clips_lead_with_the_captioned_motion_unless_asked_to_start_at_the_wall():
    moving = [m for m in world.MOTIONS if m != "stays still"]
    plain = [world.sample_spec(np.random.default_rng(s), motion=moving[s % 4]) for s in range(100)]
    assert all(b is None or b >= world.LEAD_SECONDS - 1 / 8 for b in map(_first_bounce_s, plain))
    edge = [world.sample_spec(np.random.default_rng(s), motion=moving[s % 4], bounce_within=0.5) for s in range(100)]
    bounces = [_first_bounce_s(s) for s in edge]
    assert all(b is not None and b <= 0.5 + 1 / 8 for b in bounces)  # at the wall within half a second
    assert min(bounces) == 0.0  # some start touching it
    still = world.sample_spec(0, motion="stays still", bounce_within=0.5)  # no wall to move toward: as before
    assert still == world.sample_spec(0, motion="stays still")
    with pytest.raises(ValueError, match="bounce_within must be >= 0 seconds, got -1"):
        world.sample_spec(0, bounce_within=-1)


def test_speed_within_range():
    for seed in range(100):
        spec = world.sample_spec(seed)
        assert world.SPEED_RANGE[0] <= spec.speed <= world.SPEED_RANGE[1]
        if spec.motion == "stays still":
            continue
        spec_in = world.ClipSpec(**{**spec.to_dict(), "x0": 0.5, "y0": 0.5})
        clip = world.render_clip(spec_in, 5)  # 0.5 s from the centre: no bounce
        c0 = np.array(world.find_shape(clip[0], spec.bg_rgb)["centroid"])
        c4 = np.array(world.find_shape(clip[4], spec.bg_rgb)["centroid"])
        speed = np.linalg.norm(c4 - c0) / 64 / 0.5  # widths per second
        assert 0.09 <= speed <= 0.27, (seed, speed)


def test_spec_from_caption():
    spec = world.spec_from_caption("a purple triangle moves up on a navy background", rng=3)
    assert (spec.colour, spec.shape, spec.motion, spec.background) == ("purple", "triangle", "moves up", "navy")


def _tilted_square_mask(degrees, r=0.14, size=64, ss=4):
    g = (np.arange(size * ss) + 0.5) / (size * ss) - 0.5
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    x, y = c * g[None, :] + s * g[:, None], -s * g[None, :] + c * g[:, None]
    inside = (np.abs(x) <= 0.9 * r) & (np.abs(y) <= 0.9 * r)
    return inside.reshape(size, ss, size, ss).mean(axis=(1, 3)) >= 0.5


def test_classify_shape_names_every_rendered_frame_of_held_out_clips():
    rng = np.random.default_rng(5)
    for _ in range(60):
        spec = world.sample_spec(rng)
        for f in world.render_clip(spec, 9):
            assert world.classify_shape(world.find_shape(f, spec.bg_rgb)["mask"]) == spec.shape


def test_classify_shape_tolerates_a_small_tilt_but_not_a_diamond():
    # the bounding-box fill rule called a square tilted by 5 degrees a circle
    assert world.classify_shape(_tilted_square_mask(5)) == "square"
    assert world.classify_shape(_tilted_square_mask(8)) == "square"
    assert world.classify_shape(_tilted_square_mask(45)) != "square"
    match = world.shape_match(_tilted_square_mask(0))
    assert match["square"] > 0.95 and match["circle"] < 0.9 and match["triangle"] < 0.8


def test_classify_shape_needs_a_few_pixels():
    assert world.classify_shape(np.zeros((64, 64), bool)) is None
    m = np.zeros((64, 64), bool)
    m[10, 10:13] = True
    assert world.classify_shape(m) is None
