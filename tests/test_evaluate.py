import numpy as np

from magic_demo import world
from magic_demo.evaluate import held_out_specs, score_clips


def test_rendered_world_clips_score_perfectly():
    specs = held_out_specs(10)
    clips = [world.render_clip(s, 17, 64, 8) for s in specs]
    score = score_clips(clips, specs, fps=8)
    assert score.motion_accuracy == 1.0 and score.colour_kept == 1.0 and score.present == 1.0
    assert score.shape_kept > 0.9


def test_noise_and_wrong_colours_score_low():
    specs = held_out_specs(5)
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (17, 64, 64, 3), dtype=np.uint8) for _ in specs]
    score = score_clips(noise, specs, fps=8)
    assert score.present < 0.1 and score.colour_kept < 0.1
    # the right motion with the wrong colour: colour is not kept, motion is
    swapped = [world.render_clip(world.ClipSpec(**{**s.to_dict(), "colour": "green" if s.colour != "green" else "red",
                                                   "rgb": None}), 17, 64, 8) for s in specs]
    score = score_clips(swapped, specs, fps=8)
    assert score.colour_kept == 0.0 and score.motion_accuracy == 1.0
