"""Bad input, faults and exposure: every case gets a clear, specific answer and the server keeps working."""

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from magic_demo.video_io import read_video


# ---------------------------------------------------------------- image files a user may send
def png_bytes(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def bomb_png(width=30000, height=30000) -> bytes:
    """A tiny PNG whose header declares width x height (never to be decoded)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def picture(h=96, w=96):
    arr = np.zeros((h, w, 3), np.uint8)
    arr[h // 4: h // 2, w // 4: w // 2] = (220, 40, 40)
    return arr


def make_files(d: Path) -> dict:
    files = {}
    (d / "text.png").write_text("hello, I am not a picture")
    files["not_an_image"] = d / "text.png"
    good = png_bytes(picture())
    (d / "cut.png").write_bytes(good[: len(good) // 2])
    files["truncated_png"] = d / "cut.png"
    buf = io.BytesIO()
    Image.fromarray(picture()).save(buf, format="JPEG")
    (d / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    files["truncated_jpeg"] = d / "cut.jpg"
    (d / "bomb.png").write_bytes(bomb_png())
    files["bomb"] = d / "bomb.png"
    (d / "one.png").write_bytes(png_bytes(np.zeros((1, 1, 3), np.uint8)))
    files["1x1"] = d / "one.png"
    (d / "strip.png").write_bytes(png_bytes(np.zeros((16, 10000, 3), np.uint8)))
    files["10000x16"] = d / "strip.png"
    return files


def make_accepted(d: Path) -> dict:
    files = {}
    frames = [Image.fromarray(picture()).convert("P"), Image.fromarray(255 - picture()).convert("P")]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["animated_gif"] = d / "anim.gif"
    Image.fromarray(picture()).convert("CMYK").save(d / "cmyk.jpg", format="JPEG")
    files["cmyk_jpeg"] = d / "cmyk.jpg"
    Image.fromarray((picture()[..., 0].astype(np.uint16) * 257), mode="I;16").save(d / "deep.png")
    files["16bit_png"] = d / "deep.png"
    img = Image.fromarray(picture(64, 128))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(d / "rotated.jpg", format="JPEG", exif=exif)
    files["exif_rotated"] = d / "rotated.jpg"
    return files


REFUSED = {"not_an_image": "not an image", "truncated_png": "truncated|damaged", "truncated_jpeg": "truncated|damaged",
           "bomb": "too large", "1x1": "too small", "10000x16": "too small"}


def generate(client, image, prompt="a red square moves right", seconds=1.0, fps=8, steps=2, seed=1, overlap=0):
    return client.submit(image, prompt, seconds, fps, steps, seed, overlap, api_name="/generate")


# ---------------------------------------------------------------- through the Python API
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_python_api_refuses_bad_files(tmp_path, name):
    from magic_demo.service import DemoService

    service = DemoService("tiny-random", outputs_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=REFUSED[name]):
        service.upload(make_files(tmp_path)[name])


@pytest.mark.parametrize("name", ["animated_gif", "cmyk_jpeg", "16bit_png", "exif_rotated"])
def test_python_api_converts_odd_but_valid_files(tmp_path, name):
    from magic_demo.service import DemoService

    frame = DemoService("tiny-random", outputs_dir=tmp_path / "out").upload(make_accepted(tmp_path)[name])
    assert frame.image.mode == "RGB" and frame.image.size == (32, 32)


# ---------------------------------------------------------------- through the server
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    return {**make_files(d), **make_accepted(d)}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.png"
    path.write_bytes(png_bytes(picture()))
    return path


def assert_still_serving(client, good):
    final = generate(client, handle_file(str(good))).result()
    assert final[2]["frames"] == 8


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_server_refuses_bad_files_then_serves(client, files, good, name):
    with pytest.raises(Exception, match=REFUSED[name]):
        generate(client, handle_file(str(files[name]))).result()
    assert_still_serving(client, good)


@pytest.mark.parametrize("name", ["animated_gif", "cmyk_jpeg", "16bit_png", "exif_rotated"])
def test_server_accepts_odd_but_valid_files(client, files, name):
    final = generate(client, handle_file(str(files[name]))).result()
    assert final[2]["frames"] == 8 and final[2]["first_frame"]["source"] == "uploaded"


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt="x" * 100_000), "prompt is too long: 100000 characters"),
    (dict(seconds=float("nan")), "not JSON compliant"),  # the client cannot even send it; the engine refuses NaN too
    (dict(seconds=-1), "less than minimum"), (dict(seconds=1e9), "greater than maximum"),
    (dict(fps=0), "less than minimum"), (dict(fps=1000), "greater than maximum"),
    (dict(steps=1000), "greater than maximum"), (dict(seed=-2), "seed must be -1"),
    (dict(seed=2**70), "seed must be"), (dict(seed="a string"), "Expected a `float | None`.*a string"),
    (dict(overlap=100), "greater than maximum"),
])
def test_bad_settings_through_the_server(client, good, kwargs, message):
    with pytest.raises(Exception, match=message):
        generate(client, handle_file(str(good)), **kwargs).result()


@pytest.mark.parametrize("prompt", ["tab\tand\x00nul\x07bell", "مرحبا بالعالم", "🎬🔴⬅️ a red circle 🚀", ""])
def test_odd_prompts_are_fine(client, good, prompt):
    final = generate(client, handle_file(str(good)), prompt=prompt).result()
    assert final[2]["frames"] == 8


def test_first_frame_and_retrieve_refuse_empty_or_huge_text(client):
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("", -1, api_name="/first_frame")
    with pytest.raises(Exception, match="query is too long"):
        client.predict("y" * 5000, 4, api_name="/retrieve")


@pytest.mark.parametrize("path", ["/etc/passwd", "../../../../etc/passwd", "http://127.0.0.1:9/x.png",
                                  "file:///etc/passwd"])
def test_paths_and_urls_in_api_parameters_are_refused(client, good, path):
    payload = {"path": path, "meta": {"_type": "gradio.FileData"}}
    with pytest.raises(Exception):
        generate(client, payload).result()
    assert_still_serving(client, good)


def test_system_files_are_not_served(server):
    import urllib.request

    url = server[0]
    for path in ("gradio_api/file=/etc/passwd", "file=/etc/passwd", "gradio_api/file=../../etc/passwd"):
        try:
            with urllib.request.urlopen(url + path, timeout=10) as r:
                body = r.read()
            assert b"root:" not in body
        except Exception as exc:  # 403/404: refused, as it should be
            assert "40" in str(exc)


# ---------------------------------------------------------------- retrieval index faults
def test_retrieval_on_an_empty_or_damaged_index(tmp_path):
    from magic_demo.presets import PRESETS, Preset
    from magic_demo.service import DemoService

    empty = tmp_path / "empty_index"
    empty.mkdir()
    damaged = tmp_path / "damaged_index"
    damaged.mkdir()
    for f in (PRESETS["tiny-random"].gallery_index).iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    (damaged / "index.faiss").write_bytes(b"garbage")
    for index, message in ((empty, "not found|missing|does not|no index"), (damaged, "damaged|corrupt|checksum")):
        preset = Preset(**{**PRESETS["tiny-random"].__dict__, "name": "t", "gallery_index": index})
        with pytest.raises(ValueError, match=message):
            DemoService(preset, outputs_dir=tmp_path / "out").retrieve("a red circle", 2)


# ---------------------------------------------------------------- writing the video fails
def test_unwritable_outputs_folder_is_a_clear_error_and_the_service_recovers(tmp_path, first_frame):
    from magic_demo.first_frame import FirstFrame
    from magic_demo.service import DemoService, VideoSettings

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    service = DemoService("tiny-random", outputs_dir=blocker / "outputs")
    frame = FirstFrame(first_frame, "uploaded")
    with pytest.raises(OSError):
        list(service.run_video("job", frame, "x", VideoSettings(seconds=1.0, fps=8, steps=1)))
    assert service.running_jobs == 0
    service.outputs_dir = tmp_path / "ok"
    *_, done = service.run_video("job", frame, "x", VideoSettings(seconds=1.0, fps=8, steps=1))
    assert len(read_video(done.video_path)[0]) == 8


def test_outputs_folder_stays_bounded(tmp_path):
    from magic_demo.service import DemoService

    service = DemoService("tiny-random", outputs_dir=tmp_path, keep_outputs=5)
    for i in range(12):
        service.new_output_path().write_bytes(b"x")
        os.utime(tmp_path, None)
    assert len(list(tmp_path.iterdir())) <= 6


def test_a_presets_image_guidance_reaches_the_request(tmp_path, first_frame):
    from dataclasses import replace

    from magic_demo.presets import get_preset
    from magic_demo.service import DemoService, VideoSettings

    guided = DemoService(replace(get_preset("tiny-random"), image_guidance_scale=2.0), outputs_dir=tmp_path / "out")
    plain = DemoService("tiny-random", outputs_dir=tmp_path / "o2")
    frame = plain.upload(first_frame)
    settings = VideoSettings(seconds=1.0, fps=8)
    assert guided.make_request(frame, "a red circle", settings).image_guidance_scale == 2.0
    assert plain.make_request(frame, "a red circle", settings).image_guidance_scale == 1.0
