import math
import time

import numpy as np
import pytest
import torch

from magic_demo.events import (CancelToken, StepFinished, VideoFinished, VideoStarted, WindowFinished,
                               WindowStarted)
from magic_demo.video import VideoRequest, generate_video, stream_video
from magic_demo.video_io import read_video


def make_request(image, **kw):
    base = dict(image=image, prompt="a red circle moves left on a black background", seconds=2.0, fps=8, steps=2,
                seed=7, window_frames=9)
    base.update(kw)
    return VideoRequest(**base)


@pytest.mark.parametrize("seconds,fps,steps", [(1.0, 8, 2), (2.5, 8, 4), (3.0, 5, 1), (0.25, 4, 2)])
def test_counts_and_exact_frames(tiny_pipe, first_frame, tmp_path, seconds, fps, steps):
    req = make_request(first_frame, seconds=seconds, fps=fps, steps=steps)
    done = generate_video(tiny_pipe, req, tmp_path / "v.mp4")
    r = done.report
    frames, read_fps = read_video(done.video_path)
    assert len(frames) == round(seconds * fps) == r["frames"]
    assert read_fps == fps and frames.shape[1:] == (32, 32, 3)
    assert r["text_encoder_calls"] == 1 and r["text_encoder_2_calls"] == 1  # once per video
    assert r["transformer_calls"] == steps * r["windows"]
    assert r["vae_decode_calls"] == r["windows"] and r["vae_encode_calls"] == r["windows"]
    assert r["windows"] == len(r["per_window_s"]) == math.ceil(max(0, r["frames"] - 9) / 8) + 1


def test_image_guidance_one_more_pass_per_step_and_one_more_prompt_encode(tiny_pipe, first_frame, tmp_path):
    done = generate_video(tiny_pipe, make_request(first_frame, seconds=2.0, steps=2, image_guidance_scale=2.0),
                          tmp_path / "v.mp4")
    r = done.report
    assert r["image_guidance_scale"] == 2.0 and r["windows"] == 2
    assert r["transformer_calls"] == 2 * 2 * r["windows"]
    assert r["text_encoder_calls"] == 2  # the prompt beside the first frame and beside the neutral image, once each
    plain = generate_video(tiny_pipe, make_request(first_frame, seconds=2.0, steps=2), tmp_path / "w.mp4")
    assert not np.array_equal(read_video(done.video_path)[0], read_video(plain.video_path)[0])


def test_last_latent_condition_skips_reencoding(tiny_pipe, first_frame, tmp_path):
    done = generate_video(tiny_pipe, make_request(first_frame, seconds=3.0, condition="last_latent"), tmp_path / "v.mp4")
    assert done.report["windows"] == 3 and done.report["vae_encode_calls"] == 1
    assert len(read_video(done.video_path)[0]) == 24


def test_same_seed_same_video_other_seed_differs(tiny_pipe, first_frame, tmp_path):
    a = read_video(generate_video(tiny_pipe, make_request(first_frame), tmp_path / "a.mp4").video_path)[0]
    b = read_video(generate_video(tiny_pipe, make_request(first_frame), tmp_path / "b.mp4").video_path)[0]
    c = read_video(generate_video(tiny_pipe, make_request(first_frame, seed=8), tmp_path / "c.mp4").video_path)[0]
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0


def test_random_seed_is_reported(tiny_pipe, first_frame, tmp_path):
    events = []
    done = generate_video(tiny_pipe, make_request(first_frame, seed=-1, seconds=1.0), tmp_path / "v.mp4", events.append)
    assert 0 <= done.report["seed"] and events[0].seed == done.report["seed"]


@pytest.mark.parametrize("overlap", [0, 2])
def test_cancel_in_window_3_keeps_windows_1_and_2(tiny_pipe, first_frame, tmp_path, overlap):
    token = CancelToken()
    events = []

    def on_event(e):
        events.append(e)
        if isinstance(e, StepFinished) and e.window == 3 and e.step == 1:
            token.cancel()

    req = make_request(first_frame, seconds=5.0, steps=3, overlap=overlap)
    done = generate_video(tiny_pipe, req, tmp_path / "v.mp4", on_event, token)
    assert done.cancelled and done.report["windows_finished"] == 2
    # window 3 stopped after its first step: no more transformer calls than 2 full windows + 1 step
    assert done.report["transformer_calls"] == 2 * 3 + 1
    frames, _ = read_video(done.video_path)
    assert len(frames) == 9 + (9 - 1 - overlap) == done.report["frames"]
    assert isinstance(events[-1], VideoFinished) and events[-1].cancelled


def test_cancel_before_start_writes_nothing(tiny_pipe, first_frame, tmp_path):
    token = CancelToken()
    token.cancel()
    done = generate_video(tiny_pipe, make_request(first_frame), tmp_path / "v.mp4", cancel=token)
    assert done.cancelled and done.video_path is None and done.report["frames"] == 0


def test_event_stream_order_and_growing_video(tiny_pipe, first_frame, tmp_path):
    events = list(stream_video(tiny_pipe, make_request(first_frame, seconds=3.0, steps=2), tmp_path / "v.mp4"))
    kinds = [type(e) for e in events]
    assert kinds[0] is VideoStarted and kinds[-1] is VideoFinished
    body = events[1:-1]
    assert [e.window for e in body if isinstance(e, WindowStarted)] == [1, 2, 3]
    steps = [e for e in body if isinstance(e, StepFinished)]
    assert [(e.window, e.step) for e in steps] == [(w, s) for w in (1, 2, 3) for s in (1, 2)]
    finished = [e for e in body if isinstance(e, WindowFinished)]
    assert [e.window for e in finished] == [1, 2, 3]
    # a window is announced after its own last step (its mp4 is written while the next window denoises)
    assert all(body.index(f) > body.index(s) for f, s in zip(finished, steps[1::2]))
    assert [e.frames_written for e in finished] == [9, 17, 24]
    assert not list(tmp_path.glob("*.window-*"))  # each window's snapshot went once the next event was asked for


def test_each_window_event_has_its_own_file_until_the_consumer_moves_on(tiny_pipe, first_frame, tmp_path):
    stream = stream_video(tiny_pipe, make_request(first_frame, seconds=3.0, steps=2), tmp_path / "v.mp4")
    seen = []
    for e in stream:
        if isinstance(e, WindowFinished):
            if e.window == 1:
                time.sleep(1.0)  # a slow consumer: the writer has re-muxed window 2 into v.mp4 meanwhile
            seen.append(len(read_video(e.video_path)[0]))
        if isinstance(e, WindowFinished) and e.window == 2:
            break
    stream.close()
    assert seen == [9, 17]
    assert not list(tmp_path.glob("*.window-*"))  # a consumer that leaves early leaves no snapshots behind


def test_stream_reraises_engine_errors(tiny_pipe, first_frame, tmp_path):
    with pytest.raises(ValueError, match="seconds"):
        list(stream_video(tiny_pipe, make_request(first_frame, seconds=0), tmp_path / "v.mp4"))


def test_closing_the_stream_cancels_the_job(tiny_pipe, first_frame, tmp_path):
    stream = stream_video(tiny_pipe, make_request(first_frame, seconds=20.0, steps=2), tmp_path / "v.mp4")
    for e in stream:
        if isinstance(e, WindowFinished):
            break
    stream.close()  # a client went away: the worker is cancelled and joined
    frames, _ = read_video(tmp_path / "v.mp4")
    assert 9 <= len(frames) < 160


@pytest.mark.parametrize("kw,name", [
    (dict(seconds=0), "seconds"), (dict(seconds=-1), "seconds"), (dict(seconds=61), "seconds"),
    (dict(seconds=float("nan")), "seconds"), (dict(fps=0), "fps"), (dict(fps=1000), "fps"), (dict(fps=7.5), "fps"),
    (dict(steps=0), "steps"), (dict(steps=1000), "steps"), (dict(seed=-2), "seed"), (dict(seed=2**70), "seed"),
    (dict(seed="1"), "seed"), (dict(overlap=8), "overlap"), (dict(condition="middle"), "condition"),
    (dict(window_frames=10), "window_frames"), (dict(seconds=0.01, fps=8), "at least one frame"),
    (dict(colour_anchor="yes"), "colour_anchor"), (dict(denoise_threads=0), "denoise_threads"),
    (dict(image_guidance_scale=-1.0), "image_guidance_scale"), (dict(image_guidance_scale=float("inf")), "image_guidance_scale"),
])
def test_bad_requests_name_the_parameter(tiny_pipe, first_frame, tmp_path, kw, name):
    with pytest.raises(ValueError, match=name):
        generate_video(tiny_pipe, make_request(first_frame, **kw), tmp_path / "v.mp4")
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_bad_image_modes(tiny_pipe, first_frame, tmp_path, mode):
    with pytest.raises(ValueError, match="image must be RGB"):
        generate_video(tiny_pipe, make_request(first_frame.convert(mode)), tmp_path / "v.mp4")


def test_image_is_resized_to_requested_size(tiny_pipe, first_frame, tmp_path):
    done = generate_video(tiny_pipe, make_request(first_frame.resize((64, 64)), width=32, height=32, seconds=1.0),
                          tmp_path / "v.mp4")
    assert read_video(done.video_path)[0].shape[1:3] == (32, 32)


def test_per_frame_vae_windows_skip_decoding_the_conditioning_frame(tmp_path, first_frame):
    """With a per-frame autoencoder, windows after the first decode one frame fewer (on the writer thread), the frame
    that conditions the next window is decoded alone up front; the video is unchanged."""
    from diffusers import AutoencoderTiny

    from magic_demo.pipeline import MagicI2VPipeline
    from magic_demo.tiny import build_tiny_components

    torch.manual_seed(0)
    comps = build_tiny_components(seed=0)
    comps["vae"] = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                   latent_channels=4).eval()
    pipe = MagicI2VPipeline(**comps)
    decoded = []
    pipe.vae.decoder.register_forward_pre_hook(lambda _m, args: decoded.append(args[0].shape[0]))
    req = VideoRequest(image=first_frame, prompt="a red circle moves left", seconds=3.0, fps=8, steps=2, seed=3,
                       window_frames=9)
    done = generate_video(pipe, req, tmp_path / "v.mp4")
    # frames through the decoder: 9, 8, 7 per window (the last window is 8 frames long) + 1 conditioning frame for
    # each of windows 2 and 3
    assert sorted(decoded) == [1, 1, 7, 8, 9]
    # the skipped frame and the frame decoded alone are the ones the full decode would have given (float noise)
    lat = torch.randn(1, 4, 9, 4, 4, generator=torch.Generator().manual_seed(0))
    full, rest = pipe.decode(lat).numpy(), pipe.decode(lat[:, :, 1:]).numpy()
    assert np.abs(full[1:].astype(int) - rest.astype(int)).max() <= 1
    assert np.abs(full[8].astype(int) - pipe.decode(lat[:, :, 8:9]).numpy()[0].astype(int)).max() <= 1
    pipe.vae.to(memory_format=torch.channels_last)  # what load_pipeline does for a per-frame VAE on CPU
    assert np.abs(pipe.decode(lat).numpy().astype(int) - full.astype(int)).max() <= 1
    assert done.report["frames"] == 24 and len(read_video(done.video_path)[0]) == 24


def test_colour_anchor_maps_every_frame_and_so_each_windows_conditioning(tiny_pipe, first_frame, tmp_path):
    from magic_demo.windows import match_colours

    def run(anchor, name):
        seen = []
        encode = tiny_pipe.encode_image
        tiny_pipe.encode_image = lambda img: (seen.append(np.asarray(img).copy()), encode(img))[1]
        try:
            done = generate_video(tiny_pipe, make_request(first_frame, seconds=3.0, colour_anchor=anchor),
                                  tmp_path / name)
        finally:
            del tiny_pipe.encode_image
        return done, seen, read_video(done.video_path)[0]

    plain, plain_seen, plain_frames = run(False, "plain.mp4")
    anchored, seen, frames = run(True, "anchored.mp4")
    assert plain.report["colour_anchor"] is False and anchored.report["colour_anchor"] is True
    assert len(seen) == anchored.report["windows"] == 3
    assert np.array_equal(seen[0], np.asarray(first_frame))  # window 1: the user's frame, untouched
    # window 1 is the same clip either way, so window 2's conditioning is the same frame 8, histogram-matched
    assert np.array_equal(seen[1], match_colours(plain_seen[1], np.asarray(first_frame)))
    assert not np.array_equal(seen[1], plain_seen[1])
    # the video itself is mapped too: its frames sit near the first frame's colours, the raw noise does not
    gap = lambda video: np.abs(video.reshape(-1, 3).mean(0) - np.asarray(first_frame).reshape(-1, 3).mean(0)).max()
    assert gap(frames[1:9]) < 8 < gap(plain_frames[1:9]), (gap(frames[1:9]), gap(plain_frames[1:9]))


def test_later_windows_share_the_cores_with_the_writer_and_the_video_stays_the_same(tiny_pipe, first_frame, tmp_path):
    """Speed fix (issue 8): windows 2+ denoise on half the CPU threads while the writer thread decodes and encodes
    the previous window. Thread count only changes float summation order: frames within 2 levels, torch's setting
    restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    denoise = tiny_pipe.denoise
    tiny_pipe.denoise = lambda *a, **kw: (seen.append(torch.get_num_threads()), denoise(*a, **kw))[1]
    try:
        auto = generate_video(tiny_pipe, make_request(first_frame, seconds=3.0), tmp_path / "auto.mp4")
        same = generate_video(tiny_pipe, make_request(first_frame, seconds=3.0, denoise_threads=2),
                              tmp_path / "two.mp4")
    finally:
        del tiny_pipe.denoise
        threads_after, _ = torch.get_num_threads(), torch.set_num_threads(before)
    assert seen == [2, 1, 1, 2, 2, 2]  # window 1 has no writer beside it
    assert auto.report["denoise_threads"] == 1 and same.report["denoise_threads"] == 2
    assert threads_after == 2
    a, b = read_video(auto.video_path)[0].astype(int), read_video(same.video_path)[0].astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 2
