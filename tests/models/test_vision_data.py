"""Shapes scenes: deterministic from the key; captions and answers agree with what the pixels show."""

import re

import jax
import numpy as np
import pytest

from jaxlab.models import vision, vision_data
from jaxlab.models.vision_data import COLORS, POSITIONS, ShapesConfig

CFG = ShapesConfig(min_size=24, max_size=48, size_multiple=8, min_shapes=1, max_shapes=6)
RGB_TO_NAME = {rgb: name for name, rgb in COLORS.items()}


def read_pixels(image):
    """{position: (colour, kind)} read from the image alone: the colour of a cell's non-background pixels,
    "rectangle" if they fill their bounding box, else "circle"."""
    H, W, _ = image.shape
    found = {}
    for cell, name in enumerate(POSITIONS):
        r, c = divmod(cell, 3)
        block = image[r * H // 3:(r + 1) * H // 3, c * W // 3:(c + 1) * W // 3]
        drawn = block.any(axis=-1)
        if not drawn.any():
            continue
        colours = {tuple(int(v) for v in px) for px in block[drawn]}
        assert len(colours) == 1, (name, colours)
        ys, xs = np.nonzero(drawn)
        box = drawn[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        found[name] = (RGB_TO_NAME[colours.pop()], "rectangle" if box.all() else "circle")
    return found


def expected_answer(question, found):
    shapes = list(found.values())
    patterns = [
        (r"How many shapes are there\?", lambda: str(len(shapes))),
        (r"How many (\w+) shapes are there\?", lambda c: str(sum(s[0] == c for s in shapes))),
        (r"How many (\w+)s are there\?", lambda k: str(sum(s[1] == k for s in shapes))),
        (r"What colour is the shape at the (.+)\?", lambda p: found[p][0]),
        (r"What shape is at the (.+)\?", lambda p: found[p][1]),
        (r"Where is the (\w+) (\w+)\?", lambda c, k: next(p for p, s in found.items() if s == (c, k))),
    ]
    for pattern, answer in patterns:
        match = re.fullmatch(pattern, question)
        if match:
            return answer(*match.groups())
    raise AssertionError(f"unknown question {question!r}")


def test_answers_and_captions_match_the_pixels():
    scenes = vision_data.make_scenes(jax.random.PRNGKey(0), 40, CFG)
    kinds = set()
    for i, scene in enumerate(scenes):
        H, W, C = scene.image.shape
        assert scene.image.dtype == np.uint8 and C == 3
        assert H % 8 == 0 and W % 8 == 0 and 24 <= min(H, W) and max(H, W) <= 48
        found = read_pixels(scene.image)
        assert 1 <= len(found) <= 6 and len(found) == len(scene.shapes)
        for question, answer in scene.qa:
            assert answer == expected_answer(question, found), (i, question, answer, found)
        items = re.findall(r"an? (\w+) (\w+) at the ([a-z ]+?)(?:,|\.)", scene.caption)
        assert scene.caption.startswith(f"{len(found)} shape")
        assert {p: (c, k) for c, k, p in items} == found, (i, scene.caption)
        # a position question only when that colour and kind are unique
        asked = {q for q, _ in scene.qa if q.startswith("Where")}
        unique = [s for s in found.values() if list(found.values()).count(s) == 1]
        assert asked == {f"Where is the {c} {k}?" for c, k in unique}
        kinds.update(k for _, k in found.values())
    assert kinds == {"rectangle", "circle"}


def test_scenes_are_deterministic_and_pack():
    key = jax.random.PRNGKey(3)
    a, b = vision_data.make_scenes(key, 5, CFG), vision_data.make_scenes(key, 3, CFG)
    for x, y in zip(a, b):  # same key, same scenes (and a prefix of a longer list)
        np.testing.assert_array_equal(x.image, y.image)
        assert (x.shapes, x.caption, x.qa) == (y.shapes, y.caption, y.qa)
    other = vision_data.make_scenes(jax.random.PRNGKey(4), 5, CFG)
    assert [s.caption for s in other] != [s.caption for s in a]
    packed = vision.pack_images([s.image for s in a], patch_size=8, max_len=36)
    assert sorted(set(packed.image_ids.ravel()) - {-1}) == list(range(5))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_shapes=10), "max_shapes=10 must be <= 9"),
    (dict(min_shapes=3, max_shapes=2), "min_shapes=3 must be <= max_shapes=2"),
    (dict(min_size=20, max_size=22, size_multiple=8), "no multiple of size_multiple=8"),
    (dict(min_size=8, max_size=16), "min_size=8 too small"),
    (dict(min_side=3), "min_side=3 must be >= 4"),
    (dict(size_multiple=0), "size_multiple=0 must be an int >= 1"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesConfig(**kwargs)


def test_load_images_convert_to_rgb_and_name_bad_files(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a_rgb.png")
    grey = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    Image.fromarray(grey, mode="L").save(tmp_path / "b_grey.png")
    rgba = np.zeros((5, 7, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, np.array([0, 255, 51, 255, 0, 255, 255], np.uint8)  # alpha per column
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "c_rgba.png")
    flat = np.broadcast_to(np.array([100, 150, 200], np.uint8), (5, 7, 3))
    Image.fromarray(np.ascontiguousarray(flat)).save(tmp_path / "d.JPEG", quality=95)
    (tmp_path / "notes.txt").write_text("not an image")

    loaded = vision_data.load_image_folder(tmp_path)
    assert [p.name for p, _ in loaded] == ["a_rgb.png", "b_grey.png", "c_rgba.png", "d.JPEG"]
    for _, image in loaded:
        assert image.dtype == np.uint8 and image.shape == (5, 7, 3)
    np.testing.assert_array_equal(loaded[0][1], rgb)
    np.testing.assert_array_equal(loaded[1][1], np.repeat(grey[..., None], 3, axis=-1))
    np.testing.assert_array_equal(loaded[2][1][0, :, 0], [0, 200, 40, 200, 0, 200, 200])  # over black
    assert np.abs(loaded[3][1].astype(int) - flat).max() <= 3  # JPEG is lossy

    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"image file .*corrupt\.png cannot be decoded"):
        vision_data.load_image(tmp_path / "corrupt.png")
    with pytest.raises(ValueError, match=r"image file .*empty\.png is empty \(0 bytes\)"):
        vision_data.load_image(tmp_path / "empty.png")
    with pytest.raises(FileNotFoundError, match=r"image file .*missing\.png does not exist"):
        vision_data.load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"corrupt\.png cannot be decoded"):  # a folder with a bad file
        vision_data.load_image_folder(tmp_path)

    lines = ['{"image": "a_rgb.png", "text": "noise"}', "", f'{{"image": "{tmp_path / "c_rgba.png"}", "text": "bars"}}']
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    pairs = vision_data.load_image_text(tmp_path / "pairs.jsonl")
    assert [(p.path.name, p.text) for p in pairs] == [("a_rgb.png", "noise"), ("c_rgba.png", "bars")]
    np.testing.assert_array_equal(pairs[1].image, loaded[2][1])
    for bad, match in [('{"image": "missing.png", "text": "x"}', r"line 1: image file .*missing\.png does not exist"),
                       ('{"image": "empty.png", "text": "x"}', r"line 1: image file .*empty\.png is empty"),
                       ('{"image": "a_rgb.png"}', r"line 1: must be an object with the keys 'image' and 'text'"),
                       ('{"image": "a_rgb.png", "text": 3}', r"line 1: 'image' and 'text' must be strings"),
                       ("{not json", r"bad\.jsonl, line 1: not valid JSON")]:
        (tmp_path / "bad.jsonl").write_text(bad + "\n")
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            vision_data.load_image_text(tmp_path / "bad.jsonl")
