"""Input sources besides the API: a watched directory and an OpenCV camera. The simulator adds its world.

A source is polled on a schedule and returns the frames ready now; the agent sends them through the same
micro-batcher as API requests, so they are answered, scored by UTS and uplinked in the same way.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from common.errors import ConfigError, TandemError
from device.agent.step import Frame

log = logging.getLogger("tandem.device.sources")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@runtime_checkable
class Source(Protocol):
    """Anything that yields frames with questions (the fleet simulator's world implements this)."""

    name: str

    def poll(self) -> list[Frame]:
        """Frames ready now (possibly none)."""
        ...

    def close(self) -> None:
        """Release what the source holds."""
        ...


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8 array of a JPEG/PNG; TandemError naming what is wrong (not an image, truncated, too large)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ("JPEG", "PNG"):
                raise TandemError(f"image must be JPEG or PNG, got {im.format}")
            if im.width * im.height > max_pixels:
                raise TandemError(f"image of {im.width}x{im.height} pixels exceeds {max_pixels} pixels")
            im.load()
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise TandemError("image bytes are not a JPEG or PNG image") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise TandemError(f"image is truncated or corrupt: {exc}") from None


class DirectorySource:
    """Images in a directory, each answered once; ``<stem>.txt`` holds its question(s), one per line, else the
    configured questions are asked. What was answered is remembered in ``state_file`` across restarts."""

    def __init__(
        self,
        path: str | Path,
        questions: list[str],
        state_file: str | Path,
        max_pixels: int = 4096 * 4096,
        name: str = "directory",
    ) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConfigError(f"source directory not found: {self.path}")
        self.questions = list(questions)
        self.state_file = Path(state_file)
        self.max_pixels = max_pixels
        self.name = name
        self.seen: dict[str, float] = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def _questions_for(self, image: Path) -> list[str]:
        side = image.with_suffix(".txt")
        if side.is_file():
            lines = [ln.strip() for ln in side.read_text().splitlines() if ln.strip()]
            if lines:
                return lines
        return self.questions

    def poll(self) -> list[Frame]:
        frames: list[Frame] = []
        for image in sorted(self.path.iterdir()):
            if image.suffix.lower() not in IMAGE_SUFFIXES or not image.is_file():
                continue
            mtime = image.stat().st_mtime
            if self.seen.get(image.name) == mtime:
                continue
            self.seen[image.name] = mtime
            questions = self._questions_for(image)
            if not questions:
                log.warning("no question for %s (add %s or configure questions)", image, image.with_suffix(".txt").name)
                continue
            try:
                pixels = decode_image(image.read_bytes(), self.max_pixels)
            except TandemError as exc:
                log.warning("skipping %s: %s", image, exc)
                continue
            frames += [Frame(q, image=pixels, metadata={"source": self.name, "file": image.name}) for q in questions]
        if frames:
            self._save()
        return frames

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(self.seen))
        os.replace(tmp, self.state_file)

    def close(self) -> None:
        return None


class CameraSource:
    """One frame per poll from an OpenCV capture (camera index, stream URL or video file)."""

    def __init__(self, device: int | str, questions: list[str], name: str = "camera") -> None:
        try:
            import cv2
        except ImportError:
            raise ConfigError("the camera source needs OpenCV: pip install 'tandem-mllm[camera]'") from None
        self._cv2 = cv2
        self.capture = cv2.VideoCapture(device)
        if not self.capture.isOpened():
            raise ConfigError(f"cannot open camera {device!r}")
        self.questions = list(questions)
        self.name = name
        self.frames_read = 0

    def poll(self) -> list[Frame]:
        ok, bgr = self.capture.read()
        if not ok or bgr is None:
            return []
        self.frames_read += 1
        rgb = self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB)
        meta = {"source": self.name, "frame": str(self.frames_read)}
        return [Frame(q, image=rgb, metadata=meta) for q in self.questions]

    def close(self) -> None:
        self.capture.release()
