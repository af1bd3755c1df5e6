"""Frame sources: files, folders, HTTP streams with reconnect, and clear errors for bad input."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from camera.sources import (
    ImageFolderSource,
    LiveSource,
    SourceError,
    VideoFileSource,
    _opencv_opener,
    open_source,
)
from tests.conftest import NEGATIVE_CLIP
from tests.services import HttpServer


def _write_video(path: Path, n: int = 20, fps: float = 10.0, size: tuple[int, int] = (160, 120)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(n):
        img = np.full((size[1], size[0], 3), 10 * i % 256, np.uint8)
        cv2.putText(img, str(i), (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 255), 2)
        writer.write(img)
    writer.release()
    return path


def test_video_file_every_frame_with_file_timestamps(tmp_path):
    clip = _write_video(tmp_path / "c.avi", n=20, fps=10)
    src = open_source(str(clip), start_time=1_700_000_000.0)
    assert isinstance(src, VideoFileSource) and not src.live and src.fps == pytest.approx(10)
    frames = list(src)
    assert [f.index for f in frames] == list(range(20))
    assert [f.ts for f in frames] == pytest.approx([1_700_000_000.0 + i / 10 for i in range(20)])
    assert frames[0].image.shape == (120, 160, 3)
    assert src.state == "ended" and src.dropped == 0 and src.frames_read == 20


def test_video_file_target_fps_skips_and_counts(tmp_path):
    clip = _write_video(tmp_path / "c.avi", n=20, fps=10)
    src = open_source(str(clip), fps=2.5)
    frames = list(src)
    assert [f.index for f in frames] == [0, 4, 8, 12, 16]
    assert src.dropped == 15 and src.frames_read == 20


def test_video_file_loop_plays_again_with_time_running_on(tmp_path):
    clip = _write_video(tmp_path / "c.avi", n=10, fps=10)
    src = open_source(str(clip), start_time=1_700_000_000.0, loop=3)
    frames = list(src)
    assert [f.index for f in frames] == list(range(30)) and src.frames_read == 30
    assert [f.ts for f in frames] == pytest.approx([1_700_000_000.0 + i / 10 for i in range(30)])
    # the same pictures again: frame 10 is frame 0 of the second play
    assert np.abs(frames[10].image.astype(int) - frames[0].image.astype(int)).mean() < 2
    with pytest.raises(SourceError, match="loop must be >= 0"):
        open_source(str(clip), loop=-1)


def test_real_clip_frame_count_and_size():
    src = open_source(str(NEGATIVE_CLIP), fps=10)  # a 60 fps clip at 10 fps: every 6th frame
    frames = []
    for f in src:
        frames.append(f)
        if len(frames) == 5:
            break
    src.close()
    assert [f.index for f in frames] == [0, 6, 12, 18, 24]
    assert frames[0].image.shape[1::-1] == (320, 240)


def test_image_folder_in_name_order_skipping_unreadable(tmp_path):
    for name, value in (("b.png", 50), ("a.jpg", 100), ("c.png", 150)):
        cv2.imwrite(str(tmp_path / name), np.full((40, 60, 3), value, np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    src = open_source(str(tmp_path), start_time=0.0)
    assert isinstance(src, ImageFolderSource)
    frames = list(src)
    assert [int(f.image[0, 0, 0]) for f in frames] == [pytest.approx(100, abs=3), 50, 150]
    assert src.dropped == 1  # broken.jpg, logged and counted
    assert [f.ts for f in frames] == [0.0, 1.0, 3.0]  # name order: a, b, broken (skipped), c


def test_image_folder_loop_plays_again_with_time_running_on(tmp_path):
    """--loop was accepted and ignored for folders (issue 12)."""
    for name, value in (("a.png", 10), ("b.png", 20)):
        cv2.imwrite(str(tmp_path / name), np.full((40, 60, 3), value, np.uint8))
    src = open_source(str(tmp_path), start_time=0.0, fps=2.0, loop=3)
    frames = list(src)
    assert [int(f.image[0, 0, 0]) for f in frames] == [10, 20] * 3
    assert [f.index for f in frames] == list(range(6)) and src.frames_read == 6
    assert [f.ts for f in frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    forever = open_source(str(tmp_path), start_time=0.0, loop=0)
    taken = [f for _, f in zip(range(7), forever, strict=False)]
    forever.close()
    assert [f.index for f in taken] == list(range(7))
    with pytest.raises(SourceError, match="loop must be >= 0"):
        open_source(str(tmp_path), loop=-1)


def test_a_video_file_closed_before_reading_releases_its_capture(tmp_path):
    """The capture was released only by the decoder thread, which never starts when the run fails before the
    first frame (e.g. the model cannot be loaded)."""
    src = open_source(str(_write_video(tmp_path / "c.avi", n=5)))
    assert src.cap.isOpened()
    src.close()
    assert not src.cap.isOpened()
    read = open_source(str(_write_video(tmp_path / "d.avi", n=5)))
    assert len(list(read)) == 5
    read.close()  # after a full read too (the decoder thread released it; a second release is harmless)
    assert not read.cap.isOpened()


def test_interrupt_ends_iteration_after_the_current_frame(tmp_path):
    src = open_source(str(_write_video(tmp_path / "c.avi", n=20)))
    frames = []
    for frame in src:
        frames.append(frame)
        if len(frames) == 3:
            src.interrupt()  # what a signal handler calls: no join, no release
    assert len(frames) == 3


@pytest.mark.parametrize(("spec", "message"), [
    ("/nonexistent/clip.mp4", "source not found"),
    ("ftp://example.com/x", "unsupported source URL scheme"),
    ("7", "cannot open camera 7"),
    ("picamera", "picamera2 is not installed"),
    ("", "empty source"),
])
def test_bad_sources_are_clear_errors(spec, message):
    with pytest.raises(SourceError, match=message):
        open_source(spec)


def test_not_a_video_and_empty_folder(tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_text("hello")
    with pytest.raises(SourceError, match="cannot open video file"):
        open_source(str(fake))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no images"):
        open_source(str(empty))
    single = tmp_path / "one.jpg"
    cv2.imwrite(str(single), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SourceError, match="single image"):
        open_source(str(single))


def test_url_credentials_are_redacted_in_errors():
    with pytest.raises(SourceError) as info:
        open_source("ftp://user:secret@example.com/x")
    assert "secret" not in str(info.value)


def _wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_http_stream_reconnects_after_the_server_goes_away(tmp_path):
    """A live HTTP source: frames flow, the stream ends and the server disappears → reconnecting with backoff,
    the server comes back → connected again, reconnect counted, frames flow again."""
    _write_video(tmp_path / "live.avi", n=30, fps=30)
    server = HttpServer(tmp_path)
    src = open_source(f"http://127.0.0.1:{server.port}/live.avi")
    try:
        assert isinstance(src, LiveSource) and src.live and src.kind == "stream"
        frames = src.frames()
        first = next(frames)
        assert first.image.shape == (120, 160, 3)
        server.stop()
        assert _wait(lambda: src.state == "reconnecting")
        time.sleep(1.0)  # a few failed attempts with backoff
        assert src.state == "reconnecting" and src.reconnects == 0
        server.start()
        assert _wait(lambda: src.reconnects >= 1)
        got = next(frames)
        assert got.index > first.index
    finally:
        src.close()
        server.stop()
    assert src.state == "ended"


def test_live_source_keeps_only_the_latest_frame(tmp_path):
    """A slow consumer never falls behind: frames it could not take are dropped and counted."""
    clip = _write_video(tmp_path / "c.avi", n=200, fps=30)
    src = LiveSource("test", _opencv_opener(str(clip), "test clip", api=cv2.CAP_FFMPEG))
    try:
        frames = src.frames()
        seen = [next(frames)]
        assert _wait(lambda: src.frames_read >= 50)  # consumer busy while the reader decodes on
        seen.append(next(frames))
        assert seen[1].index - seen[0].index > 1  # jumped to the newest frame
        assert _wait(lambda: src.dropped >= seen[1].index - 1)
    finally:
        src.close()
