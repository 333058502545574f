"""Tier 2: the real Gradio server (tiny-random preset) driven through its named API with gradio_client."""

import time

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from magic_demo.video_io import read_video


@pytest.fixture(scope="module")
def upload_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("up") / "frame.png"
    arr = np.zeros((96, 128, 3), np.uint8)
    arr[30:60, 40:70] = (40, 200, 40)
    Image.fromarray(arr).save(path)
    return path


def generate(client, image, seconds=2.0, steps=2, seed=3, overlap=0, prompt="a green square moves up", **kw):
    return client.submit(handle_file(str(image)), prompt, seconds, 8, steps, seed, overlap, **kw,
                         api_name="/generate")


def test_named_endpoints(client):
    assert {"/first_frame", "/retrieve", "/generate", "/stop"} <= set(client.view_api(return_format="dict")["named_endpoints"])


def test_generated_first_frame_then_video(client):
    path, info = client.predict("a red circle moves left", 11, api_name="/first_frame")
    assert Image.open(path).size == (32, 32)
    assert info["source"] == "generated" and info["seed"] == 11
    job = generate(client, path, seconds=3.0)
    outputs = list(job)
    videos = [o[0] for o in outputs if isinstance(o[0], str)]
    assert len(videos) >= 3  # one growing mp4 per window (3 windows) plus the final one
    # Each window's yield is its own playable mp4, growing by whole windows (a snapshot: the writer re-muxes the
    # next window into the video's path while gradio may still be copying this one)
    assert [len(read_video(v)[0]) for v in videos[:3]] == [9, 17, 24]
    final = outputs[-1]
    assert final[2]["frames"] == 24 and final[2]["text_encoder_calls"] == 1 and final[3] == 3
    assert final[1].startswith("Done")


def test_retrieved_first_frame(client):
    gallery, hits = client.predict("a blue square on a black background", 3, api_name="/retrieve")
    assert len(gallery) == len(hits) == 3
    assert [h["rank"] for h in hits] == [0, 1, 2] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert all(h["source"] == "retrieved" and h["gallery_path"] for h in hits)
    picked = gallery[0]["image"]
    assert Image.open(picked).size == (32, 32)
    final = list(generate(client, picked, seconds=1.0))[-1]
    assert final[2]["frames"] == 8 and final[2]["colour_anchor"] is True  # on unless unticked
    final = list(generate(client, picked, seconds=2.0, colour_anchor=False))[-1]
    assert final[2]["frames"] == 16 and final[2]["colour_anchor"] is False


def test_uploaded_first_frame_and_random_seed_written_back(client, upload_png):
    final = list(generate(client, upload_png, seconds=1.5, seed=-1))[-1]
    assert final[2]["frames"] == 12
    assert final[3] >= 0 and final[3] == final[2]["seed"]
    assert len(read_video(final[0])[0]) == 12


def test_stop_keeps_finished_windows_and_next_job_runs(client, upload_png):
    job = generate(client, upload_png, seconds=30.0, steps=4)
    while True:
        time.sleep(0.05)
        out = job.outputs()
        if any(isinstance(o[0], str) for o in out):
            break
        assert not job.done(), "job ended before its first window"
    assert client.predict(api_name="/stop").startswith("Stopping")
    final = job.result()
    report = final[2]
    assert final[1].startswith("Stopped") and report["cancelled"]
    assert 1 <= report["windows_finished"] < report["windows"]
    assert len(read_video(final[0])[0]) == report["frames"] == 9 + 8 * (report["windows_finished"] - 1)
    assert list(generate(client, upload_png, seconds=1.0))[-1][2]["frames"] == 8


@pytest.mark.parametrize("kwargs,message", [
    # slider bounds are checked by Gradio itself, the rest by the engine
    (dict(seconds=0), "less than minimum value 0.5"), (dict(seconds=120), "greater than maximum value 60"),
    (dict(steps=0), "less than minimum value 1"), (dict(overlap=20), "greater than maximum value 7"),
    (dict(seed=-5), "seed must be -1"), (dict(seed=2**70), "seed must be"),
])
def test_bad_settings_are_readable_errors(client, upload_png, kwargs, message):
    with pytest.raises(Exception, match=message):
        generate(client, upload_png, **kwargs).result()


def test_no_first_frame_and_unreadable_upload(client, tmp_path):
    with pytest.raises(Exception, match="Choose a first frame"):
        client.predict(None, "x", 1.0, 8, 2, 1, 0, api_name="/generate")
    fake = tmp_path / "fake.png"
    fake.write_text("this is not an image")
    with pytest.raises(Exception, match="not an image|cannot identify|not a supported"):
        generate(client, fake).result()
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("  ", -1, api_name="/first_frame")
    # the server still answers
    assert list(generate(client, _png(tmp_path), seconds=1.0))[-1][2]["frames"] == 8


def _png(tmp_path):
    path = tmp_path / "ok.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(path)
    return path


def test_gpu_duration_estimate_grows_with_length():
    from magic_demo.ui import estimate_gpu_seconds

    assert estimate_gpu_seconds(5) < estimate_gpu_seconds(60) == 150
    assert estimate_gpu_seconds("nonsense") == 30 and estimate_gpu_seconds(1e9) == 150
