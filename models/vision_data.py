"""Synthetic shapes scenes for vision-language tests: images of random sizes with captions and QA pairs.

A scene is an RGB image (uint8 ``[H, W, 3]``, black background) of random height and width (multiples of
``size_multiple``, the patch size, so :func:`jaxlab.models.vision.pack_images` takes it as it is) split into
a 3 x 3 grid of cells; each shape (a filled axis-aligned rectangle or a filled circle, in one of the
named colours) lies inside its own cell, so a shape's position is the name of its cell ("top left", ...,
"center", ..., "bottom right") and counts, colours and positions are unambiguous. Its text is derived from
the list of drawn shapes only:

* ``caption``: "3 shapes: a red circle at the top left, a blue rectangle at the center, ..." (cells in
  raster order);
* ``qa``: (question, answer) pairs of four kinds: count ("How many shapes are there?", "How many red
  shapes are there?", "How many circles are there?"), colour ("What colour is the shape at the top
  left?"), kind ("What shape is at the center?") and position ("Where is the blue rectangle?", asked only
  when that colour and kind occur once).

Everything is drawn from a JAX PRNG key: the key's bits seed a NumPy generator (scenes are built on the
host, one Python object per shape), so the same key gives the same scene on every backend, and
:func:`make_scenes` gives scene i the key ``fold_in(key, i)``.

    scenes = make_scenes(jax.random.PRNGKey(0), 16, ShapesConfig(size_multiple=14))
    packed = vision.pack_images([s.image for s in scenes], patch_size=14, max_len=256)

Real images: :func:`load_image` reads a PNG/JPEG file (Pillow) as uint8 ``[H, W, 3]`` RGB (greyscale and
palette images converted, an alpha channel composited over the black background the scenes use);
:func:`load_image_folder` reads every PNG/JPEG of a folder (sorted by name) and :func:`load_image_text`
a JSONL file of ``{"image": path, "text": ...}`` records (paths relative to the file's folder). A missing
path, an empty (0-byte) or 0-pixel file or one Pillow cannot decode raises an error naming the file.

    pairs = load_image_text("data/captions.jsonl")        # [ImageText(path, image, text), ...]
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np

from jaxlab.validation import check, check_positive

__all__ = ["COLORS", "IMAGE_SUFFIXES", "KINDS", "POSITIONS", "ImageText", "Scene", "Shape", "ShapesConfig",
           "host_rng", "load_image", "load_image_folder", "load_image_text", "make_scene", "make_scenes",
           "resize_nearest"]

COLORS = {"red": (230, 25, 25), "green": (25, 200, 40), "blue": (30, 60, 230), "yellow": (240, 220, 20),
          "magenta": (220, 30, 220), "cyan": (20, 220, 230), "white": (255, 255, 255)}
"""Colour names and their RGB values (all far from the black background and from each other)."""
KINDS = ("rectangle", "circle")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
"""Names of the 3 x 3 cells in raster order (cell ``3 r + c``: row r, column c)."""


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """Scene sizes and contents."""

    min_size: int = 24
    """Smallest image height/width in pixels (rounded up to a multiple of ``size_multiple``)."""
    max_size: int = 64
    """Largest image height/width in pixels (rounded down to a multiple of ``size_multiple``)."""
    size_multiple: int = 8
    """Heights and widths are multiples of this (the ViT's patch size)."""
    min_shapes: int = 1
    max_shapes: int = 4
    """At most 9: each shape has a cell of the 3 x 3 grid to itself."""
    min_side: int = 4
    """Smallest shape height/width (a circle's diameter) in pixels."""

    def __post_init__(self):
        check_positive(self, "min_size", "max_size", "size_multiple", "min_shapes", "max_shapes", "min_side",
                       integer=True)
        check(self.max_shapes <= len(POSITIONS), f"max_shapes={self.max_shapes} must be <= {len(POSITIONS)} "
                                                 "(one shape per cell of the 3 x 3 grid)")
        check(self.min_shapes <= self.max_shapes,
              f"min_shapes={self.min_shapes} must be <= max_shapes={self.max_shapes}")
        check(self.min_side >= 4, f"min_side={self.min_side} must be >= 4 (a circle must differ from a square)")
        check(self.size_range[0] <= self.size_range[1],
              f"no multiple of size_multiple={self.size_multiple} lies in [min_size={self.min_size}, "
              f"max_size={self.max_size}]")
        check(self.size_range[0] // 3 >= self.min_side + 2,
              f"min_size={self.min_size} too small: a cell (a third of the image) must hold min_side="
              f"{self.min_side} pixels plus a 1-pixel margin on each side")

    @property
    def size_range(self) -> tuple[int, int]:
        """(smallest, largest) image side, both multiples of ``size_multiple``."""
        m = self.size_multiple
        return -(-self.min_size // m) * m, self.max_size // m * m


@dataclasses.dataclass(frozen=True)
class Shape:
    """One drawn shape: its bounding box ``[top, top + height) x [left, left + width)`` (a circle's is a
    square, the circle inscribed in it)."""

    kind: str
    color: str
    cell: int
    """Index into ``POSITIONS``."""
    top: int
    left: int
    height: int
    width: int

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclasses.dataclass(frozen=True)
class Scene:
    image: np.ndarray
    """uint8 [H, W, 3]."""
    shapes: tuple[Shape, ...]
    """In cell (raster) order."""
    caption: str
    qa: tuple[tuple[str, str], ...]
    """(question, answer) pairs."""


def _cell_bounds(size: int, index: int) -> tuple[int, int]:
    """Pixel range [lo, hi) of cell ``index`` (0, 1, 2) along an axis of ``size`` pixels."""
    return index * size // 3, (index + 1) * size // 3


def _draw(image: np.ndarray, shape: Shape) -> None:
    box = image[shape.top:shape.top + shape.height, shape.left:shape.left + shape.width]
    if shape.kind == "rectangle":
        box[...] = COLORS[shape.color]
        return
    s = shape.height  # square box; the circle of diameter s inscribed in it
    y, x = np.mgrid[:s, :s]
    inside = (y - (s - 1) / 2) ** 2 + (x - (s - 1) / 2) ** 2 <= (s / 2) ** 2
    box[inside] = COLORS[shape.color]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _text(shapes: tuple[Shape, ...]) -> tuple[str, tuple[tuple[str, str], ...]]:
    n = len(shapes)
    caption = f"{n} shape{'s' * (n != 1)}: " + ", ".join(
        f"{_article(s.color)} {s.color} {s.kind} at the {s.position}" for s in shapes) + "."
    qa = [("How many shapes are there?", str(n))]
    for color in sorted({s.color for s in shapes}):
        qa.append((f"How many {color} shapes are there?", str(sum(s.color == color for s in shapes))))
    for kind in KINDS:
        qa.append((f"How many {kind}s are there?", str(sum(s.kind == kind for s in shapes))))
    for s in shapes:
        qa.append((f"What colour is the shape at the {s.position}?", s.color))
        qa.append((f"What shape is at the {s.position}?", s.kind))
        if sum((t.color, t.kind) == (s.color, s.kind) for t in shapes) == 1:
            qa.append((f"Where is the {s.color} {s.kind}?", s.position))
    return caption, tuple(qa)


def host_rng(key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded by the bits of a JAX PRNG key (raw ``uint32[2]`` or typed): the host-side draws
    of the data generated from a key (scenes, GUI screens and tasks, the reasoning task's base corpus)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def resize_nearest(image: np.ndarray, size: int) -> np.ndarray:
    """``image [H, W, ...]`` resized to ``[size, size, ...]`` by the nearest source pixel of each pixel centre
    (dtype kept; nearest keeps the scenes' colours pure)."""
    H, W = image.shape[:2]
    rows = np.minimum(((np.arange(size) + 0.5) * H / size).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * W / size).astype(np.int64), W - 1)
    return image[rows][:, cols]


def make_scene(key, cfg: ShapesConfig = ShapesConfig()) -> Scene:
    """One scene drawn from the PRNG ``key`` (see the module docstring)."""
    rng = host_rng(key)
    lo, hi = cfg.size_range
    m = cfg.size_multiple
    H, W = (int(rng.integers(lo // m, hi // m + 1)) * m for _ in range(2))
    count = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    cells = np.sort(rng.choice(len(POSITIONS), size=count, replace=False))
    names = list(COLORS)
    image = np.zeros((H, W, 3), np.uint8)
    shapes = []
    for cell in cells:
        (y0, y1), (x0, x1) = _cell_bounds(H, cell // 3), _cell_bounds(W, cell % 3)
        room_h, room_w = y1 - y0 - 2, x1 - x0 - 2  # a 1-pixel margin inside the cell
        kind = KINDS[int(rng.integers(len(KINDS)))]
        if kind == "circle":
            h = w = int(rng.integers(cfg.min_side, min(room_h, room_w) + 1))
        else:
            h, w = int(rng.integers(cfg.min_side, room_h + 1)), int(rng.integers(cfg.min_side, room_w + 1))
        top = y0 + 1 + int(rng.integers(room_h - h + 1))
        left = x0 + 1 + int(rng.integers(room_w - w + 1))
        shape = Shape(kind, names[int(rng.integers(len(names)))], int(cell), top, left, h, w)
        _draw(image, shape)
        shapes.append(shape)
    shapes = tuple(shapes)
    caption, qa = _text(shapes)
    return Scene(image, shapes, caption, qa)


def make_scenes(key, num: int, cfg: ShapesConfig = ShapesConfig()) -> list[Scene]:
    """``num`` scenes; scene i from ``fold_in(key, i)`` (so a prefix of a longer list is the same)."""
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
        raise ValueError(f"num={num!r} must be an int >= 0")
    return [make_scene(jax.random.fold_in(key, i), cfg) for i in range(num)]


# ---- real images ----------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
"""File name endings :func:`load_image_folder` reads (any case)."""


@dataclasses.dataclass(frozen=True)
class ImageText:
    path: pathlib.Path
    image: np.ndarray
    """uint8 [H, W, 3] RGB."""
    text: str


def load_image(path) -> np.ndarray:
    """The image file at ``path`` as uint8 [H, W, 3] RGB. Greyscale, palette and 16-bit images are converted
    to RGB; an alpha channel (RGBA, LA, a palette's transparency) is composited over black. Errors name the
    file: ``FileNotFoundError`` for a missing path, ``ValueError`` for an empty file, a file Pillow cannot
    decode or an image with no pixels."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415  (Pillow only where files are read)

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist (or is not a file)")
    if path.stat().st_size == 0:
        raise ValueError(f"image file {path} is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()
            if im.width == 0 or im.height == 0:
                raise ValueError(f"image file {path} has no pixels ({im.width} x {im.height})")
            alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
            if im.mode.startswith("I;16") or im.mode == "I":  # 16/32-bit greyscale: scale to 8 bits
                array = np.asarray(im, np.float64)
                top = 65535.0 if im.mode.startswith("I;16") else max(float(array.max()), 1.0)
                return np.repeat(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
            rgba = np.asarray(im.convert("RGBA" if alpha else "RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"image file {path} cannot be decoded: {e}") from None
    if alpha:  # over black: rgb * alpha
        rgb = rgba[..., :3].astype(np.uint16) * rgba[..., 3:].astype(np.uint16)
        return ((rgb + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(rgba)


def load_image_folder(folder) -> list[tuple[pathlib.Path, np.ndarray]]:
    """``(path, image)`` for every PNG/JPEG file directly in ``folder`` (sorted by name; see :func:`load_image`)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist (or is not a folder)")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"image folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return [(p, load_image(p)) for p in paths]


def load_image_text(jsonl, *, image_key: str = "image", text_key: str = "text") -> list[ImageText]:
    """The (image, text) records of a JSONL file, one JSON object per line with the image's path under
    ``image_key`` (relative paths from the JSONL file's folder) and its text under ``text_key``; blank lines
    are skipped. Errors name the file and line (bad JSON, a missing key, a text that is not a string) or the
    image file (see :func:`load_image`)."""
    jsonl = pathlib.Path(jsonl)
    if not jsonl.is_file():
        raise FileNotFoundError(f"JSONL file {jsonl} does not exist (or is not a file)")
    records = []
    for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{jsonl}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or image_key not in record or text_key not in record:
            raise ValueError(f"{where}: must be an object with the keys {image_key!r} and {text_key!r}, got "
                             f"{line[:80]!r}")
        if not isinstance(record[text_key], str) or not isinstance(record[image_key], str):
            raise ValueError(f"{where}: {image_key!r} and {text_key!r} must be strings")
        path = pathlib.Path(record[image_key])
        path = path if path.is_absolute() else jsonl.parent / path
        try:
            image = load_image(path)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None
        records.append(ImageText(path, image, record[text_key]))
    if not records:
        raise ValueError(f"JSONL file {jsonl} holds no records")
    return records
