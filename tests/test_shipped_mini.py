"""The shipped miniature preset makes meaningful video (issue 5's "done when"), on CPU like CI: through the real
app server and gradio_client, the issue's example prompt with a generated, a retrieved and an uploaded first frame
gives a video in which the circle moves left; and on held-out first frames the 4-step student moves the shape in
the captioned direction far above chance. These guard the committed weights and the engine that runs them: a
random transformer scores motion 20% and shape present 1% here, and fails.

Measured on this project's 2-core CPU machine (session 5): the circle moves left in 6 of 6 videos; its colour is
not kept (majority colour yellow from the generated and retrieved frames, purple and red from the example upload;
README, "Honest state"), so colour is not asserted here: issue 5 stays open on it."""

import numpy as np
import pytest
from gradio_client import Client, handle_file

from magic_demo import evaluate, world
from magic_demo.presets import get_preset, load_pipeline
from magic_demo.video_io import read_video
from tests.conftest import EXAMPLE_FIRST_FRAME, EXAMPLE_PROMPT, launch_app

FPS = 8


@pytest.fixture(scope="module")
def mini_client(tmp_path_factory):
    demo, _service, url = launch_app(tmp_path_factory.mktemp("mini_app"))
    client = None
    try:
        client = Client(url, verbose=False)
        yield client
    finally:
        if client is not None:
            client.close()
        demo.close()


def first_frames(client) -> dict[str, str]:
    """route -> first-frame image path. (Through the API every frame reaches /generate as a file the client
    uploads; where it came from lives in the browser session's state, so it is checked here, not in the report.)"""
    generated, info = client.predict(EXAMPLE_PROMPT, 0, api_name="/first_frame")
    assert info["source"] == "generated"
    gallery, hits = client.predict(EXAMPLE_PROMPT, 1, api_name="/retrieve")
    assert hits[0]["source"] == "retrieved" and world.parse_caption(hits[0]["caption"])["shape"] == "circle"
    return {"generated": generated, "retrieved": gallery[0]["image"], "uploaded": str(EXAMPLE_FIRST_FRAME)}


def test_the_issues_example_moves_left_from_every_first_frame_route(mini_client):
    analysed = {}
    for route, image in first_frames(mini_client).items():
        for seed in (0, 1):
            video, status, report, _ = mini_client.predict(handle_file(image), EXAMPLE_PROMPT, 2.0, FPS, 4, seed, 0,
                                                           api_name="/generate")
            assert status.startswith("Done") and report["preset"] == "mini" and report["colour_anchor"] is True
            frames, _ = read_video(video)
            assert len(frames) == 2 * FPS
            pixels = frames.shape[1] * frames.shape[2]
            bg = world.estimate_background(frames[0])
            present = np.mean([evaluate.shape_present(world.find_shape(f, bg), pixels) for f in frames])
            clip = world.analyse_clip(frames, fps=FPS)
            analysed[route, seed] = (clip["motion"], clip["colour"], present)
    assert sum(motion == "moves left" for motion, _, _ in analysed.values()) >= 5, analysed
    assert all(present >= 0.8 for _, _, present in analysed.values()), analysed


def test_held_out_clips_move_as_captioned_far_above_chance():
    preset = get_preset("mini")
    score = evaluate.evaluate_i2v(load_pipeline(preset, device="cpu"), n=15, steps=preset.steps,
                                  num_frames=preset.window_frames, fps=preset.fps, size=preset.width,
                                  guidance_scale=preset.guidance_scale)
    # Measured on these 15 clips (session 5): motion 67%, colour kept 60%, present 96%. On 80 clips: motion 71-78%, colour kept ~50%, present ~94%.
    # Chance: motion 20%, colour 12.5%.
    assert score.motion_accuracy >= 0.45, score
    assert score.present >= 0.85, score
    assert score.colour_kept >= 0.3, score
