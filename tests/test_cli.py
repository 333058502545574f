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


def test_bad_arguments_exit_2_with_message(tmp_path, first_frame):
    image = tmp_path / "first.png"
    first_frame.save(image)
    done = run_cli("generate", "--preset", "tiny-random", "--image", str(image), "--prompt", "x", "--seconds", "-1",
                   "--out", str(tmp_path / "o.mp4"))
    assert done.returncode == 2 and "seconds must be" in done.stderr
    done = run_cli("generate", "--preset", "tiny-random", "--image", str(tmp_path / "missing.png"), "--prompt", "x")
    assert done.returncode == 2 and "cannot be read" in done.stderr
