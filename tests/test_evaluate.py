import json

import numpy as np
import pytest

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


def _spec(**kw):
    base = dict(shape="square", colour="red", motion="moves right", background="black", x0=0.3, y0=0.5, speed=0.2)
    return world.ClipSpec(**{**base, **kw})


def test_clip_metrics_measure_speed_smoothness_flicker_and_first_frame():
    from magic_demo.evaluate import clip_metrics

    spec = _spec()
    clip = world.render_clip(spec, 9, 64, 8)  # 1 s, no bounce: constant speed 0.2 widths/s
    m = clip_metrics(clip, spec, fps=8, first_frame=clip[0])
    assert m["motion_ok"] == 1.0 and m["colour_kept"] == 1.0
    assert abs(m["dynamic_degree"] - 0.2) < 0.02
    assert m["acceleration"] < 1.0 and m["flicker"] == 0.0 and m["first_frame_psnr"] == 99.0
    still = clip_metrics(world.render_clip(_spec(motion="stays still"), 9, 64, 8), spec, fps=8)
    assert still["dynamic_degree"] < 0.01 and still["motion_ok"] == 0.0
    # jitter the centroid and add background noise: smoothness and flicker get worse, PSNR drops
    rng = np.random.default_rng(0)
    shaky = np.stack([np.roll(f, 3 * (-1) ** t, axis=0) for t, f in enumerate(clip)])  # up, down, up...
    noisy = np.clip(shaky.astype(int) + rng.integers(-20, 21, shaky.shape), 0, 255).astype(np.uint8)
    bad = clip_metrics(noisy, spec, fps=8, first_frame=clip[0])
    assert bad["acceleration"] > 5.0 and bad["flicker"] > 5.0 and bad["first_frame_psnr"] < 30.0


def test_table1_rows_markdown_and_fig5_plot(tmp_path, tiny_pipe):
    from magic_demo.distill.report import Setting, load_curve, markdown_table, plot_curves, table1, write_table1

    rows = table1([Setting("data", None, 0), Setting("tiny 2 steps", tiny_pipe, 2)], prompts=2, seeds=2,
                  num_frames=5, size=32, progress=lambda _m: None)
    assert [r["clips"] for r in rows] == [2, 4]  # ground truth once, the model once per seed
    assert rows[0]["motion_ok"] == 1.0 and rows[0]["flicker"] < 0.5 and rows[0]["first_frame_psnr"] == 99.0
    assert rows[1]["first_frame_psnr"] < 60.0  # a random model does not reproduce the first frame exactly
    md = write_table1(rows, tmp_path, note="tiny").read_text()
    assert md.count("\n|") == 3 and "| data | 100.0 |" in md and md.rstrip().endswith("tiny")
    assert markdown_table(rows).splitlines()[0].startswith("| setting | motion direction acc.")
    curve = [{"iter": i, "motion_accuracy": 0.2 + i / 100, "colour_kept": 0.5} for i in (0, 10, 20)]
    (tmp_path / "c.json").write_text(json.dumps(curve))
    png = plot_curves({"TI2V": load_curve(tmp_path / "c.json"), "T2V": curve}, tmp_path / "fig5.png")
    assert png.stat().st_size > 5000
    (tmp_path / "bad.json").write_text('{"iter": 1}')
    with pytest.raises(ValueError, match="not a distillation curve"):
        load_curve(tmp_path / "bad.json")


def test_first_frame_routes_score_each_route_against_the_caption():
    from PIL import Image

    from magic_demo.evaluate import evaluate_first_frame_routes

    class StillPipe:  # stands in for the model: a video that never moves from its first frame
        def __call__(self, image, prompt, num_frames, **kw):
            clip = np.repeat(np.asarray(image)[None], num_frames, axis=0)
            return type("Clip", (), {"numpy": lambda self: clip})()

    def rendered(text, i):
        return Image.fromarray(world.render_first_frame(world.spec_from_caption(text, rng=i)))

    def wrong_colour(text, i):
        words = world.parse_caption(text)
        other = "red" if words["colour"] != "red" else "blue"
        return Image.fromarray(world.render_first_frame(world.sample_spec(i, **{**words, "colour": other})))

    r = evaluate_first_frame_routes(StillPipe(), {"rendered": rendered, "wrong": wrong_colour}, n=10, num_frames=9)
    assert r["rendered"] == {"clips": 10, "motion_ok": 0.2, "colour_kept": 1.0, "shape_kept": 1.0, "present": 1.0}
    assert r["wrong"]["colour_kept"] == 0.0 and r["wrong"]["present"] == 1.0  # 2 of 10 captions say "stays still"


def test_long_video_eval_reads_back_its_mp4s_for_the_chosen_held_out_set(tmp_path, tiny_pipe):
    from magic_demo.evaluate import evaluate_long_video

    r = evaluate_long_video(tiny_pipe, seconds=2.0, fps=8, window_frames=9, n=2, steps=1, size=32,
                            out_dir=str(tmp_path), spec_seed=30_000)
    assert [run["caption"] for run in r["runs"]] == [world.caption(s) for s in held_out_specs(2, seed=30_000)]
    assert [run["caption"] for run in r["runs"]] != [world.caption(s) for s in held_out_specs(2, seed=20_000)]
    assert all(run["frames"] == 16 and (tmp_path / f"long_{i}.mp4").is_file() for i, run in enumerate(r["runs"]))
    assert 0.0 <= r["colour_kept"] <= r["present"] <= 1.0  # a frame with the right colour has a shape present
    assert 0.0 <= r["shape_kept"] <= r["present"]  # and so does one with the right shape
    for key in ("colour_kept", "shape_kept", "present"):  # per video, averaging to the overall figure
        assert np.mean([run[key] for run in r["runs"]]) == pytest.approx(r[key], abs=1e-4)
    # two windows: frames 0-8, then 9-15 (window 2 starts on frame 8, the one it is conditioned on)
    for run in r["runs"]:
        a, b = run["shape_kept_by_window"]
        assert (9 * a + 7 * b) / 16 == pytest.approx(run["shape_kept"], abs=2e-3)
    assert r["shape_kept_first_window"] == pytest.approx(np.mean([run["shape_kept_by_window"][0] for run in r["runs"]]),
                                                         abs=1e-3)
    assert r["shape_kept_later_windows"] == pytest.approx(np.mean([run["shape_kept_by_window"][1] for run in r["runs"]]),
                                                          abs=1e-3)
