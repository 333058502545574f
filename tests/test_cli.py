import json
import subprocess
import sys
from pathlib import Path

from magic_demo.video_io import read_video

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "magic_demo", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_generate_writes_mp4_and_report(tmp_path, first_frame):
    image = tmp_path / "first.png"
    first_frame.save(image)
    out, report = tmp_path / "out.mp4", tmp_path / "report.json"
    done = run_cli("generate", "--preset", "tiny-random", "--image", str(image), "--prompt",
                   "a red circle moves left on a black background", "--seconds", "3", "--fps", "8", "--steps", "4",
                   "--seed", "3", "--quantize", "int8", "--out", str(out), "--report", str(report))
    assert done.returncode == 0, done.stderr
    assert "windows" in done.stderr  # tqdm progress on stderr
    r = json.loads(report.read_text())
    for key in ("preset", "frames", "fps", "seconds", "windows", "steps", "transformer_calls", "text_encoder_calls",
                "vae_encode_calls", "vae_decode_calls", "wall_s", "per_window_s", "peak_rss_mb", "quantized", "seed"):
        assert key in r
    assert r["frames"] == 24 and r["windows"] == 3 and r["seed"] == 3 and r["quantized"] is True
    assert r["text_encoder_calls"] == 1 and r["transformer_calls"] == 4 * 3
    assert len(read_video(out)[0]) == 24


def test_image_guidance_flag_reaches_the_sampler(tmp_path, first_frame):
    image = tmp_path / "first.png"
    first_frame.save(image)
    report = tmp_path / "report.json"
    done = run_cli("generate", "--preset", "tiny-random", "--image", str(image), "--prompt", "a red circle",
                   "--seconds", "1", "--steps", "2", "--seed", "3", "--image-guidance-scale", "2",
                   "--out", str(tmp_path / "o.mp4"), "--report", str(report))
    assert done.returncode == 0, done.stderr
    r = json.loads(report.read_text())
    assert r["image_guidance_scale"] == 2.0 and r["windows"] == 1 and r["transformer_calls"] == 2 * 2
    done = run_cli("generate", "--preset", "tiny-random", "--image", str(image), "--prompt", "x",
                   "--image-guidance-scale", "-3", "--out", str(tmp_path / "p.mp4"))
    assert done.returncode == 2 and "image_guidance_scale must be" in done.stderr


def test_bad_arguments_exit_2_with_message(tmp_path, first_frame):
    image = tmp_path / "first.png"
    first_frame.save(image)
    done = run_cli("generate", "--preset", "tiny-random", "--image", str(image), "--prompt", "x", "--seconds", "-1",
                   "--out", str(tmp_path / "o.mp4"))
    assert done.returncode == 2 and "seconds must be" in done.stderr
    done = run_cli("generate", "--preset", "tiny-random", "--image", str(tmp_path / "missing.png"), "--prompt", "x")
    assert done.returncode == 2 and "cannot be read" in done.stderr


def test_eval_prints_figures_and_writes_the_sample_sheet(tmp_path):
    done = run_cli("eval", "--preset", "tiny-random", "--what", "i2v", "long", "--clips", "2", "--steps", "2",
                   "--videos", "1", "--seconds", "2", "--out", str(tmp_path), "--json", str(tmp_path / "e.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "e.json").read_text())
    assert results["i2v_2_steps"]["clips"] == 2 and 0 <= results["i2v_2_steps"]["motion_accuracy"] <= 1
    assert results["long_video"]["videos"] == 1 and results["long_video"]["runs"][0]["frames"] == 16
    # the long videos go to a folder of the preset's own (two evals can run side by side)
    assert Path(results["long_video"]["runs"][0]["video"]).parent.name == "tiny-random"
    from PIL import Image

    assert Image.open(tmp_path / "tiny-random_samples.png").size[0] > 0


def test_table1_and_fig5_from_the_shipped_miniature_presets(tmp_path):
    curve = [{"iter": i, "motion_accuracy": 0.5, "colour_kept": 0.5} for i in (0, 100)]
    (tmp_path / "c.json").write_text(json.dumps(curve))
    done = run_cli("eval", "--what", "table1", "fig5", "--clips", "1", "--seeds", "1", "--out", str(tmp_path),
                   "--curves", f"TI2V={tmp_path / 'c.json'}", f"T2V={tmp_path / 'c.json'}")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "table1.json").read_text())
    assert [r["steps"] for r in rows] == [0, 56, 28, 16, 8, 4, 8, 4]  # data, teacher x5, students 8 and 4
    assert all(r["clips"] == 1 for r in rows)
    assert (tmp_path / "fig5_dmd2_ti2v_vs_t2v.png").stat().st_size > 5000
    bad = run_cli("eval", "--what", "fig5", "--curves", "no-equals-sign", "--out", str(tmp_path))
    assert bad.returncode != 0 and "NAME=PATH" in bad.stderr
