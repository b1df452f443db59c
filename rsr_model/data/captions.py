"""A local image-caption folder: images with a `metadata.jsonl` beside them.

Layout (the Hugging Face `imagefolder` convention, so the same folder loads with
`datasets.load_dataset("imagefolder", data_dir=DIR)`):

    DIR/
      metadata.jsonl       one JSON object per line:
                             {"file_name": "a.png", "text": "a red circle"}
                             {"file_name": "sub/b.jpg", "text": "two blue squares"}
      a.png
      sub/b.jpg

- `file_name` is a path relative to DIR (sub-folders allowed; absolute paths and paths that
  leave DIR are refused). The caption is `text` (`caption` is accepted as well).
- Blank lines are skipped; every other line must be a JSON object with both fields.
- Any format Pillow reads works; images are converted to RGB (transparent pixels over
  white), resized so the shorter side equals the model's resolution and centre-cropped
  to a square, then scaled to [-1, 1] as (3, H, W) float32 -- what diffusers' SD3
  training scripts feed the VAE.

Errors are `CaptionFolderError` with one line naming the folder, metadata line or image at
fault. Every image is opened and verified when the folder is read, so a corrupt or
non-image file is reported before any training starts (a file that verifies but then fails
to decode is reported, by name, when it is first loaded).

Batches are drawn by a numpy Generator: `batch(rng, n, size)` is a pure function of the rng
state and the folder, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cli_common.errors import UserError

METADATA = "metadata.jsonl"
LAYOUT_HINT = 'one JSON object per line: {"file_name": "a.png", "text": "a caption"}'


class CaptionFolderError(UserError):
    """An image-caption folder that cannot be used; the message is one line for users."""


@dataclass(frozen=True)
class Item:
    path: Path  # the image file
    text: str  # its caption
    line: int  # 1-based line of metadata.jsonl that lists it


def _short(e: BaseException) -> str:
    msg = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class CaptionFolder:
    """The items of `DIR/metadata.jsonl`, validated; images are loaded on demand."""

    def __init__(self, root: str | Path, verify_images: bool = True) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise CaptionFolderError(f"caption folder not found: {self.root}")
        if not self.root.is_dir():
            raise CaptionFolderError(f"caption folder is not a folder: {self.root}")
        meta = self.root / METADATA
        if not meta.is_file():
            raise CaptionFolderError(f"{self.root} has no {METADATA} ({LAYOUT_HINT})")
        self.metadata = meta
        self.items = self._read_metadata(meta)
        if not self.items:
            raise CaptionFolderError(f"{meta} lists no images ({LAYOUT_HINT})")
        if verify_images:
            for item in self.items:
                self._verify(item)

    # --- reading ------------------------------------------------------------------------------
    def _read_metadata(self, meta: Path) -> list[Item]:
        try:
            text = meta.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CaptionFolderError(f"{meta} is not UTF-8 text") from None
        except OSError as e:
            raise CaptionFolderError(f"cannot read {meta}: {_short(e)}") from None
        root = self.root.resolve()
        items = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{meta} line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CaptionFolderError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise CaptionFolderError(f"{where}: expected a JSON object ({LAYOUT_HINT})")
            name = obj.get("file_name")
            caption = obj.get("text", obj.get("caption"))
            if not isinstance(name, str) or not name.strip():
                raise CaptionFolderError(f'{where}: "file_name" missing or not a string ({LAYOUT_HINT})')
            if not isinstance(caption, str):
                raise CaptionFolderError(f'{where}: "text" missing or not a string ({LAYOUT_HINT})')
            rel = Path(name)
            path = (self.root / rel)
            if rel.is_absolute() or not path.resolve().is_relative_to(root):
                raise CaptionFolderError(f"{where}: file_name {name!r} is not a path inside {self.root}")
            if not path.is_file():
                raise CaptionFolderError(f"{where}: image not found: {path}")
            items.append(Item(path, caption, n))
        return items

    def _bad_image(self, item: Item, e: BaseException) -> CaptionFolderError:
        return CaptionFolderError(f"cannot read image {item.path} ({METADATA} line {item.line}): "
                                  f"not an image or corrupt ({_short(e)})")

    def _verify(self, item: Item) -> None:
        from PIL import Image

        try:
            with Image.open(item.path) as im:
                im.verify()
                if im.width <= 0 or im.height <= 0:
                    raise ValueError("empty image")
        except Exception as e:  # Pillow raises many types for foreign or damaged files
            raise self._bad_image(item, e) from None

    # --- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    @property
    def captions(self) -> list[str]:
        return [it.text for it in self.items]

    def image(self, index: int, size: int) -> np.ndarray:
        """Image `index` as (3, size, size) float32 in [-1, 1] (resize shorter side, centre crop)."""
        from PIL import Image

        item = self.items[index]
        try:
            with Image.open(item.path) as im:
                im.load()
                rgb = _to_rgb(im)
        except Exception as e:
            raise self._bad_image(item, e) from None
        return to_model_space(rgb, size)

    def images(self, indices: Sequence[int], size: int) -> np.ndarray:
        return np.stack([self.image(int(i), size) for i in indices])

    def sample_indices(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n indices drawn by rng: without replacement while n <= len(self), else with."""
        return rng.choice(len(self.items), size=n, replace=n > len(self.items))

    def batch(self, rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(images (n, 3, size, size) in [-1, 1], captions, indices), a function of the rng state."""
        idx = self.sample_indices(rng, n)
        return self.images(idx, size), [self.items[i].text for i in idx], idx


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def to_model_space(im, size: int) -> np.ndarray:
    """PIL RGB image -> (3, size, size) float32 in [-1, 1]: shorter side to `size`, centre crop."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    x = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(x.transpose(2, 0, 1))
