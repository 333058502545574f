"""First frames: bucket fitting, every upload case (accepted and refused), tiny text-to-image."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from magic_demo import first_frame as ff
from magic_demo.first_frame import (
    FirstFrame,
    FirstFrameError,
    ImageTooSmallError,
    NotAnImageError,
    TooManyBytesError,
    TooManyPixelsError,
    TruncatedImageError,
    fit_to_bucket,
    load_upload,
    select_bucket,
)
from magic_demo.text_to_image import TextToImage

torch.set_num_threads(1)

BUCKETS = [(96, 64), (64, 96), (80, 80)]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _solid(size=(120, 90), colour=(200, 40, 40), mode="RGB"):
    return Image.new(mode, size, colour)


# ------------------------------------------------------------------------------------------ buckets
def test_select_bucket_closest_aspect_and_validation():
    assert select_bucket((1920, 1080), ff.DEFAULT_BUCKETS) == (960, 544)
    assert select_bucket((1080, 1920), ff.DEFAULT_BUCKETS) == (544, 960)
    assert select_bucket((1000, 1000), ff.DEFAULT_BUCKETS) == (720, 720)
    assert select_bucket((3000, 4000), ff.DEFAULT_BUCKETS) == (624, 832)
    # same aspect: the bucket closest in area wins
    assert select_bucket((70, 70), [(720, 720), (64, 64)]) == (64, 64)
    with pytest.raises(ValueError, match="multiples of 16"):
        select_bucket((10, 10), [(100, 64)])


def test_fit_to_bucket_covers_and_centre_crops():
    # 200x100: left quarter red, middle half green, right quarter blue -> square crop keeps the green middle
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, :50] = (255, 0, 0)
    a[:, 50:150] = (0, 255, 0)
    a[:, 150:] = (0, 0, 255)
    out = fit_to_bucket(Image.fromarray(a), [(64, 64)])
    assert out.size == (64, 64) and out.mode == "RGB"
    arr = np.asarray(out).astype(int)
    assert (arr[:, 2:-2, 1] > 200).all() and (arr[:, 2:-2, 0] < 60).all()
    # wide image into the widest bucket, grayscale input comes out RGB
    out2 = fit_to_bucket(Image.new("L", (300, 200), 128), BUCKETS)
    assert out2.size == (96, 64) and out2.mode == "RGB"
    # tiny image is upscaled to cover
    assert fit_to_bucket(_solid((10, 30)), BUCKETS).size == (64, 96)


# ------------------------------------------------------------------------------------------ accepted uploads
@pytest.mark.parametrize("kind", ["path", "bytes", "fileobj", "pil"])
def test_upload_png_all_input_kinds(tmp_path, kind):
    img = _solid((120, 90))
    data = _encode(img, "PNG")
    p = tmp_path / "up.png"
    p.write_bytes(data)
    src = {"path": str(p), "bytes": data, "fileobj": io.BytesIO(data), "pil": img}[kind]
    f = load_upload(src, BUCKETS)
    assert isinstance(f, FirstFrame) and f.source == "uploaded"
    assert f.image.size == (96, 64) and f.image.mode == "RGB"
    assert f.provenance["original_size"] == [120, 90]
    assert f.provenance["bucket"] == [96, 64]
    json.dumps(f.provenance)  # goes into the generation report
    assert np.allclose(np.asarray(f.image)[10, 10], (200, 40, 40), atol=2)
    if kind == "path":
        assert f.provenance["filename"] == "up.png" and len(f.provenance["sha256"]) == 64


def test_upload_exif_orientation_applied():
    # stored landscape 120x80 with the top half red; orientation 6 = display rotated 90 degrees clockwise
    a = np.zeros((80, 120, 3), np.uint8)
    a[:40] = (255, 0, 0)
    a[40:] = (0, 0, 255)
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6
    f = load_upload(_encode(img, "JPEG", exif=exif.tobytes(), quality=95), BUCKETS)
    assert f.image.size == (64, 96)  # upright portrait
    assert f.provenance["exif_orientation"] == 6
    arr = np.asarray(f.image).astype(int)
    # after a clockwise quarter turn the stored top (red) is on the right
    assert arr[48, -5, 0] > 200 and arr[48, 5, 2] > 200


def test_upload_rgba_composited_on_background():
    img = Image.new("RGBA", (100, 100), (255, 0, 0, 0))  # fully transparent red
    img.paste((0, 0, 255, 255), (0, 0, 50, 100))  # opaque blue left half
    f = load_upload(_encode(img, "PNG"), [(80, 80)])
    arr = np.asarray(f.image).astype(int)
    assert f.provenance["alpha_composited"] is True and f.provenance["background"] == [255, 255, 255]
    assert np.allclose(arr[40, 70], (255, 255, 255), atol=2)  # transparent -> white background
    assert np.allclose(arr[40, 10], (0, 0, 255), atol=2)
    f2 = load_upload(_encode(img, "PNG"), [(80, 80)], background=(0, 0, 0))
    assert np.allclose(np.asarray(f2.image)[40, 70], (0, 0, 0), atol=2)


def test_upload_palette_with_transparency_and_la():
    p = Image.new("P", (80, 80), 0)
    p.putpalette([0, 255, 0] + [255, 0, 0] * 255)
    p.paste(1, (40, 0, 80, 80))
    p.info["transparency"] = 1
    f = load_upload(_encode(p, "PNG", transparency=1), [(80, 80)])
    arr = np.asarray(f.image).astype(int)
    assert np.allclose(arr[40, 10], (0, 255, 0), atol=2) and np.allclose(arr[40, 70], (255, 255, 255), atol=2)
    la = Image.new("LA", (80, 80), (0, 0))
    f2 = load_upload(_encode(la, "PNG"), [(80, 80)])
    assert np.allclose(np.asarray(f2.image)[5, 5], (255, 255, 255), atol=2)


def test_upload_grayscale_16bit_cmyk_webp():
    g = load_upload(_encode(Image.new("L", (80, 80), 77), "PNG"), [(80, 80)])
    assert np.allclose(np.asarray(g.image)[3, 3], (77, 77, 77), atol=1)
    a16 = np.full((80, 80), 65535, np.uint16)
    a16[:, 40:] = 32896  # 128 * 257
    img16 = Image.fromarray(a16)
    assert img16.mode.startswith("I;16")
    f16 = load_upload(_encode(img16, "PNG"), [(80, 80)])
    arr = np.asarray(f16.image).astype(int)
    assert arr[40, 5].tolist() == [255, 255, 255] and arr[40, 75].tolist() == [128, 128, 128]
    assert f16.provenance["original_mode"].startswith("I")
    cmyk = Image.new("CMYK", (80, 80), (0, 255, 255, 0))  # pure red in CMYK
    fc = load_upload(_encode(cmyk, "JPEG", quality=95), [(80, 80)])
    assert fc.provenance["original_mode"] == "CMYK"
    r, gg, b = np.asarray(fc.image)[40, 40].astype(int)
    assert r > 200 and gg < 60 and b < 60
    fw = load_upload(_encode(_solid((100, 150), (10, 200, 30)), "WEBP", lossless=True), BUCKETS)
    assert fw.provenance["format"] == "WEBP" and fw.image.size == (64, 96)


def test_upload_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (80, 80), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    f = load_upload(buf.getvalue(), [(80, 80)])
    assert f.provenance["animated"] is True and f.provenance["n_frames"] == 3
    r, g, b = np.asarray(f.image)[40, 40].astype(int)
    assert r > 200 and g < 50 and b < 50


# ------------------------------------------------------------------------------------------ refused uploads
def test_refuse_not_an_image(tmp_path):
    with pytest.raises(NotAnImageError, match="not an image"):
        load_upload(b"hello, this is text and not a picture" * 10, BUCKETS)
    with pytest.raises(NotAnImageError, match="empty"):
        load_upload(b"", BUCKETS)
    with pytest.raises(FirstFrameError, match="not found"):
        load_upload(tmp_path / "missing.png", BUCKETS)
    assert issubclass(FirstFrameError, ValueError)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_refuse_truncated(fmt):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    data = _encode(noisy, fmt)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(TruncatedImageError, match="truncated"):
        load_upload(data[: len(data) // 2], BUCKETS)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (invalid) data chunk: never decodable."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_refuse_decompression_bomb_before_decoding(monkeypatch):
    def no_decode(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(TooManyPixelsError, match="too large"):
        load_upload(_png_header_only(20000, 20000), BUCKETS)
    # below Pillow's own bomb limit, our lower limit still refuses on the header alone
    with pytest.raises(TooManyPixelsError, match=r"9000x9000 = 81000000 pixels.*refused before decoding"):
        load_upload(_png_header_only(9000, 9000), BUCKETS)
    with pytest.raises(TooManyPixelsError, match="limit is 10000 pixels"):
        load_upload(_encode(_solid((200, 200)), "PNG"), BUCKETS, max_pixels=10_000)


def test_refuse_too_many_bytes(tmp_path):
    data = _encode(_solid((120, 90)), "PNG")
    with pytest.raises(TooManyBytesError, match=r"file too large: \d+ bytes, the limit is 100 bytes"):
        load_upload(data, BUCKETS, max_bytes=100)
    p = tmp_path / "big.png"
    p.write_bytes(data)
    with pytest.raises(TooManyBytesError, match="the limit is 100 bytes"):
        load_upload(p, BUCKETS, max_bytes=100)
    with pytest.raises(TooManyBytesError, match="more than 100 bytes"):
        load_upload(io.BytesIO(data), BUCKETS, max_bytes=100)


def test_refuse_too_small():
    with pytest.raises(ImageTooSmallError, match=r"too small: 100x20, each side must be at least 64"):
        load_upload(_encode(_solid((100, 20)), "PNG"), BUCKETS)
    assert load_upload(_encode(_solid((100, 20)), "PNG"), BUCKETS, min_side=16).image.size == (96, 64)


def test_first_frame_validation():
    with pytest.raises(ValueError, match="source"):
        FirstFrame(image=_solid(), source="dreamed", provenance={})
    with pytest.raises(ValueError, match="RGB"):
        FirstFrame(image=_solid(mode="L", colour=3), source="uploaded", provenance={})


# ------------------------------------------------------------------------------------------ text-to-image
@pytest.fixture(scope="module")
def t2i():
    return TextToImage.tiny_random(seed=0)


def test_generation_matches_bucket_and_is_seeded(t2i):
    for bucket in [(64, 48), (48, 64), (64, 64)]:
        f = t2i.generate("a red circle on a navy background", seed=3, bucket=bucket)
        assert f.image.size == bucket and f.image.mode == "RGB" and f.source == "generated"
        assert f.provenance["seed"] == 3 and f.provenance["bucket"] == list(bucket)
    a = t2i.generate("a red circle", seed=7, bucket=(64, 48))
    b = t2i.generate("a red circle", seed=7, bucket=(64, 48))
    c = t2i.generate("a red circle", seed=8, bucket=(64, 48))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    r = t2i.generate("anything", seed=None, bucket=(64, 64))
    assert isinstance(r.provenance["seed"], int)
    json.dumps(r.provenance)


def test_generation_at_native_size_is_snapped_to_big_bucket():
    t2i = TextToImage.tiny_random(seed=0, native_size=(64, 64), num_inference_steps=1)
    f = t2i.generate("a blue square", seed=1, bucket=(960, 544))
    assert f.image.size == (960, 544)
    assert f.provenance["generated_size"] == [64, 64]
