import os

import numpy as np
import pytest

from magic_demo.video_io import SegmentedMp4Writer, VideoWriteError, read_video


@pytest.mark.parametrize("segments", [[7, 6, 2], [9, 8], [1, 5], [33] * 3])
def test_segments_join_into_exact_frames(tmp_path, segments):
    with SegmentedMp4Writer(tmp_path / "v.mp4", fps=8) as writer:
        for i, n in enumerate(segments):
            writer.append(np.full((n, 32, 48, 3), 40 * i + 20, np.uint8))
            path = writer.publish()  # playable after every segment
            frames, fps = read_video(path)
            assert len(frames) == sum(segments[: i + 1]) and fps == 8
    assert frames.shape[1:] == (32, 48, 3)
    # flat colours survive H.264 within a few levels, and each segment lands where it belongs
    means = [frames[sum(segments[:i]) : sum(segments[: i + 1])].mean() for i in range(len(segments))]
    assert np.allclose(means, [40 * i + 20 for i in range(len(segments))], atol=3)
    assert sorted(os.listdir(tmp_path)) == ["v.mp4"]  # the segment folder is removed on close


def test_bad_frames_are_refused(tmp_path):
    with SegmentedMp4Writer(tmp_path / "v.mp4", fps=8) as writer:
        with pytest.raises(ValueError, match="frames"):
            writer.append(np.zeros((0, 16, 16, 3), np.uint8))
        with pytest.raises(VideoWriteError, match="no frames"):
            writer.publish()


def test_unwritable_folder_gives_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(VideoWriteError, match="cannot write video"):
        SegmentedMp4Writer(blocker / "v.mp4", fps=8)


def test_frames_must_keep_their_size(tmp_path):
    with SegmentedMp4Writer(tmp_path / "v.mp4", fps=8) as writer:
        writer.append(np.zeros((3, 16, 16, 3), np.uint8))
        with pytest.raises(ValueError, match="frames must stay 16x16, got 32x16"):
            writer.append(np.zeros((3, 32, 16, 3), np.uint8))
        assert len(read_video(writer.publish())[0]) == 3  # what was written stays playable
