"""Live frame sources: folder watch policies, video pacing and end, the OpenCV
source (on a file: no camera here), the fake camera's simulated loss."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from station.camera.live import SOURCES, EndOfSource, FakeSource, FolderSource, OpenCVSource, VideoSource, make_source
from station.config import parse_config
from station.errors import CameraError
from station.types import Frame, FrameError

SAMPLE = sorted((Path(__file__).resolve().parent.parent / "samples").glob("*.png"))[0]


def put(folder: Path, name: str, age_s: float = 5.0) -> Path:
    path = folder / name
    shutil.copyfile(SAMPLE, path)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def drain(source, timeout: float = 0.2) -> list:
    out = []
    while (item := source.read(timeout)) is not None:
        out.append(item)
    return out


def test_folder_takes_settled_files_oldest_first_and_deletes_after_done(tmp_path):
    put(tmp_path, "b.png", age_s=10)
    put(tmp_path, "a.png", age_s=20)
    put(tmp_path, ".a-temporary-name.png", age_s=30)  # a dot-file: being written, renamed when complete
    (tmp_path / "notes.txt").write_text("not an image")
    src = FolderSource(tmp_path, after="delete", settle_s=0.3)
    src.open()
    assert src.read(0.1) is None  # an old mtime is not enough: size and mtime must be seen stable for settle_s
    items = [src.read(1.0), src.read(1.0)]
    assert [Path(i.source).name for i in items] == ["a.png", "b.png"]
    assert drain(src) == []
    assert (tmp_path / "a.png").exists()  # kept until its result is stored
    for i in items:
        src.done(i)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a-temporary-name.png", "notes.txt"]


def test_folder_move_and_keep(tmp_path):
    inbox, done = tmp_path / "in", tmp_path / "done"
    inbox.mkdir()
    put(inbox, "a.png")
    mover = FolderSource(inbox, after="move", move_to=done, settle_s=0)
    mover.open()
    (item,) = drain(mover)
    mover.done(item)
    assert (done / "a.png").is_file() and not (inbox / "a.png").exists()

    put(inbox, "b.png")
    keeper = FolderSource(inbox, after="keep", settle_s=0)
    keeper.open()
    (item,) = drain(keeper)
    keeper.done(item)
    assert drain(keeper) == []  # not inspected twice
    assert (inbox / "b.png").is_file()


def test_folder_undecodable_file_is_an_error_item_and_missing_folder_a_camera_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    os.utime(tmp_path / "bad.png", (time.time() - 5, time.time() - 5))
    src = FolderSource(tmp_path, settle_s=0)
    src.open()
    (item,) = drain(src)
    assert isinstance(item, FrameError) and "bad.png" in item.error
    with pytest.raises(CameraError, match="watched folder does not exist"):
        FolderSource(tmp_path / "nope").open()


def write_video(path: Path, n: int, fps: float = 50) -> None:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    for i in range(n):
        w.write(np.full((48, 64, 3), i * 10, np.uint8))
    w.release()


def test_video_ends_or_loops(tmp_path):
    path = tmp_path / "v.avi"
    write_video(path, 3)
    once = VideoSource(path)
    once.open()
    assert [once.read(1).source for _ in range(3)] == [f"{path}#frame={i}" for i in range(3)]
    with pytest.raises(EndOfSource):
        once.read(1)
    looped = VideoSource(path, loop=True)
    looped.open()
    assert [looped.read(1).source.rsplit("=", 1)[1] for _ in range(7)] == ["0", "1", "2", "0", "1", "2", "0"]
    assert once.lossless and not VideoSource(path, realtime=True).lossless


def test_video_realtime_pacing(tmp_path):
    path = tmp_path / "v.avi"
    write_video(path, 6, fps=20)
    src = VideoSource(path, realtime=True)
    src.open()
    t0 = time.monotonic()
    frames = [src.read(1.0) for _ in range(6)]
    assert all(isinstance(f, Frame) for f in frames)
    assert time.monotonic() - t0 >= 0.2  # 6 frames at 20 fps: at least 5 periods of 50 ms


def test_opencv_source_reads_a_stream_and_reports_loss(tmp_path):
    path = tmp_path / "stream.avi"
    write_video(path, 2)
    src = OpenCVSource(str(path), backend="any")
    src.open()
    assert [src.read(1).image.shape for _ in range(2)] == [(48, 64, 3)] * 2
    with pytest.raises(CameraError, match="camera lost"):
        src.read(1)
    with pytest.raises(CameraError, match="cannot open"):
        OpenCVSource(str(tmp_path / "nope.avi")).open()


def test_fake_camera_loses_and_recovers():
    src = FakeSource(fps=1000, height=64, width=64, fail_after_frames=2, fail_for_s=0.3)
    src.open()
    assert [src.read(1).seq for _ in range(2)] == [0, 1]
    with pytest.raises(CameraError, match="lost after 2 frames"):
        src.read(1)
    with pytest.raises(CameraError, match="simulated loss"):
        src.open()
    time.sleep(0.35)
    src.open()
    assert src.read(1).seq == 2


def test_registry_covers_every_camera_type():
    from typing import get_args

    from station.config import CameraConfig

    union = get_args(get_args(CameraConfig)[0])
    assert sorted(SOURCES) == sorted(get_args(t.model_fields["type"].annotation)[0] for t in union)
    cfg = parse_config("camera: {type: fake, fps: 5, seed: 3}").camera
    assert isinstance(make_source(cfg), FakeSource)
