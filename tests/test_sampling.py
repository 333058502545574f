import pytest
import torch

from magic_demo.sampling import Cancelled, build_sigmas, make_scheduler, sample_euler


def test_magic_schedule_four_steps():
    sigmas, timesteps = build_sigmas(make_scheduler(), 4)
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.9375, 0.833333, 0.625, 0.0]), atol=1e-5)
    assert torch.allclose(timesteps, 1000 * sigmas[:-1], atol=1e-3)


def test_schedule_follows_shift_formula():
    for steps in (1, 8, 50):
        sigmas, _ = build_sigmas(make_scheduler(shift=5.0), steps)
        s = torch.linspace(1, 0, steps + 1)
        expected = 5 * s / (1 + 4 * s)
        assert len(sigmas) == steps + 1
        assert torch.allclose(sigmas, expected, atol=1e-5)


@pytest.mark.parametrize("steps", [0, 65, -1])
def test_schedule_rejects_step_counts(steps):
    with pytest.raises(ValueError, match="steps"):
        build_sigmas(make_scheduler(), steps)


def test_euler_is_exact_on_straight_paths():
    # For a constant velocity field the flow is a straight line: x(0) = x(1) - v, whatever the steps.
    v = torch.tensor([0.5, -2.0])
    sigmas, _ = build_sigmas(make_scheduler(), 4)
    calls = []
    out = sample_euler(lambda x, s: v.expand_as(x), torch.zeros(2), sigmas, callback=lambda i, x: calls.append(i))
    assert torch.allclose(out, -v)
    assert calls == [0, 1, 2, 3]


def test_euler_stops_before_the_next_step():
    sigmas, _ = build_sigmas(make_scheduler(), 4)
    seen = []
    with pytest.raises(Cancelled):
        sample_euler(lambda x, s: (seen.append(float(s)), x)[1], torch.zeros(1), sigmas,
                     should_stop=lambda: len(seen) == 2)
    assert len(seen) == 2
