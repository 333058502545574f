"""FailureFocus: the world-target tuners' spec sampler that favours the groups the model gets wrong."""

import collections

import numpy as np
import pytest

from magic_demo import world
from magic_demo.train.focus import FailureFocus


def specs_of(shape: str, n: int) -> list[world.ClipSpec]:
    rng = np.random.default_rng(0)
    out = []
    while len(out) < n:
        spec = world.sample_spec(rng)
        if spec.shape == shape:
            out.append(spec)
    return out


def test_rates_start_at_the_prior_and_follow_decayed_counts():
    focus = FailureFocus(keys=("shape",), decay=0.5)
    squares, circles = specs_of("square", 4), specs_of("circle", 4)
    assert focus.rate(squares[0]) == pytest.approx(0.5)  # unseen: Beta(1, 1) mean
    focus.update(squares + circles, [1.0] * 4 + [0.0] * 4)
    assert focus.rate(squares[0]) == pytest.approx(5 / 6) and focus.rate(circles[0]) == pytest.approx(1 / 6)
    focus.update(squares[:2], [0.0, 0.5])  # the old counts halve: squares seen 2 + 2, failed 2 + 0.5
    assert focus.rate(squares[0]) == pytest.approx(3.5 / 6)
    assert focus.rate(circles[0]) == pytest.approx(1 / 4)  # circles seen 2, failed 0
    assert focus.worst(1) == [("square", pytest.approx(3.5 / 6, abs=1e-3))]
    with pytest.raises(ValueError, match="2 specs and 1 failures"):
        focus.update(squares[:2], [1.0])


def test_draws_favour_failing_groups_in_proportion_to_floor_plus_rate():
    focus = FailureFocus(keys=("shape",), decay=1.0, floor=0.1)
    # squares always wrong (rate -> ~1), circles and triangles always right (rate -> ~0)
    focus.update(specs_of("square", 200), [1.0] * 200)
    focus.update(specs_of("circle", 200) + specs_of("triangle", 200), [0.0] * 400)
    rng = np.random.default_rng(1)
    counts = collections.Counter(focus.draw(rng).shape for _ in range(3000))
    rates = {s: focus.rate(specs_of(s, 1)[0]) for s in world.SHAPES}
    weights = {s: focus.floor + rates[s] for s in world.SHAPES}
    for shape in world.SHAPES:  # shapes are drawn uniformly by sample_spec, then accepted by weight
        expected = weights[shape] / sum(weights.values())
        assert counts[shape] / 3000 == pytest.approx(expected, abs=0.03)
    assert counts["square"] > 4 * counts["circle"]


def test_draw_skips_excluded_specs_is_deterministic_and_state_round_trips():
    focus = FailureFocus()
    focus.update(specs_of("triangle", 10), np.linspace(0, 1, 10))
    drawn = [focus.draw(np.random.default_rng(3), lambda s: s.shape == "circle") for _ in range(2)]
    assert drawn[0] == drawn[1] and drawn[0].shape != "circle"
    rng = np.random.default_rng(4)
    assert all(focus.draw(rng, lambda s: s.shape == "circle").shape != "circle" for _ in range(100))
    copy = FailureFocus()
    copy.load_state_dict(focus.state_dict())
    assert copy.worst(10) == focus.worst(10) and copy.rate(specs_of("triangle", 1)[0]) == focus.rate(
        specs_of("triangle", 1)[0])


def test_draws_come_from_the_given_sampler_and_edge_starts_keep_their_share():
    from magic_demo.train.batches import edge_start_sampler

    walls = FailureFocus(sample=lambda rng: world.sample_spec(rng, motion="moves right", bounce_within=0.25))
    rng = np.random.default_rng(5)
    assert all(s.motion == "moves right" and s.x0 >= 1 - s.radius - 0.25 * s.speed - 1e-9
               for s in (walls.draw(rng) for _ in range(50)))
    draw, rng = edge_start_sampler(0.3, bounce_within=0.25), np.random.default_rng(6)
    specs = [s for s in (draw(rng) for _ in range(2000)) if s.motion in ("moves right", "moves left")]
    ahead = [1 - s.radius - s.x0 if s.motion == "moves right" else s.x0 - s.radius for s in specs]  # to the wall
    at_wall = [d <= 0.25 * s.speed + 1e-9 for d, s in zip(ahead, specs)]
    assert 0.25 < np.mean(at_wall) < 0.35  # 30% drawn at the wall (plain clips never start there)
    with pytest.raises(ValueError, match="fraction must be in \\[0, 1\\], got 1.5"):
        edge_start_sampler(1.5)


@pytest.mark.parametrize("kwargs, message", [({"decay": 0.0}, "`decay` must be in \\(0, 1\\], got 0.0"),
                                             ({"floor": 0}, "`floor` must be > 0, got 0")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FailureFocus(**kwargs)
