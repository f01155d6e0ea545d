"""Image loading: modes, EXIF orientation, 16-bit scaling, and bad input (torch-free)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from octopus_rt.errors import InputError
from octopus_rt.runtime.images import content_key, load_image, open_image


def _rgb(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(image: Image.Image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_path_bytes_pil_and_array_agree(tmp_path):
    rgb = _rgb()
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    for source in (path, str(path), path.read_bytes(), Image.fromarray(rgb), rgb):
        loaded = load_image(source)
        assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == (20, 30, 3)
        np.testing.assert_array_equal(loaded.rgb, rgb)
    # Path and bytes share the key (file content); array and PIL share theirs (pixels).
    assert load_image(path).key == load_image(path.read_bytes()).key == content_key(path.read_bytes())
    assert load_image(rgb).key == load_image(Image.fromarray(rgb)).key


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "YCbCr"])
def test_modes_convert_like_pillow_rgb(mode):
    """Every mode ends as Pillow's convert("RGB") of it (what the transformers processor does)."""
    source = Image.fromarray(_rgb()).convert(mode)
    expected = np.asarray(source.convert("RGB"))
    np.testing.assert_array_equal(load_image(source).rgb, expected)
    fmt = "JPEG" if mode in ("CMYK", "YCbCr") else ("TIFF" if mode == "LA" else "PNG")
    decoded = Image.open(io.BytesIO(_png(source, fmt)))
    np.testing.assert_array_equal(load_image(_png(source, fmt)).rgb, np.asarray(decoded.convert("RGB")))


def test_palette_with_transparency():
    image = Image.fromarray(_rgb()).convert("P")
    image.info["transparency"] = 0
    out = load_image(_png(image)).rgb
    assert out.shape == (20, 30, 3)


def test_sixteen_bit_is_scaled_not_saturated():
    values = np.linspace(0, 65535, 20 * 30).reshape(20, 30).astype(np.uint16)
    image = Image.fromarray(values)  # mode I;16
    assert image.mode.startswith("I;16")
    out = load_image(_png(image)).rgb
    expected = np.rint(values / 257.0).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], expected)
    np.testing.assert_array_equal(load_image(values).rgb[:, :, 0], expected)


def test_float_arrays_in_unit_range():
    values = np.random.default_rng(1).random((10, 12, 3))
    np.testing.assert_array_equal(load_image(values).rgb, np.rint(values * 255).astype(np.uint8))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        load_image(values * 3)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied(orientation):
    rgb = _rgb(20, 30)
    image = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _png(image, "JPEG", exif=exif.tobytes(), quality=95)
    out = load_image(data).rgb
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    expected = {1: decoded, 3: np.rot90(decoded, 2), 6: np.rot90(decoded, -1), 8: np.rot90(decoded, 1)}[orientation]
    np.testing.assert_array_equal(out, expected)


def test_bad_inputs_raise_one_line_input_errors(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    full = _png(Image.fromarray(_rgb(64, 64)), "JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(full[: len(full) // 2])
    cases = {
        tmp_path / "missing.png": "not found",
        tmp_path: "not a file",
        empty: "empty",
        text: "not a readable image",
        truncated: "truncated",
        b"": "empty",
    }
    for source, message in cases.items():
        with pytest.raises(InputError, match=message) as info:
            load_image(source)
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="zero size"):
        load_image(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="dtype"):
        load_image(np.zeros((4, 5, 3), dtype=np.int32))
    with pytest.raises(InputError, match="unsupported image type"):
        load_image(12)


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    data = _png(Image.fromarray(_rgb(100, 100)))
    decoded = []
    original_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1) or original_load(self))
    with pytest.raises(InputError, match="above the limit of 5000"):
        load_image(data, max_pixels=5000)
    assert not decoded
    assert load_image(data, max_pixels=10_000).rgb.shape == (100, 100, 3)


def test_open_image_defers_decoding(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(_rgb()).save(path)
    pending = open_image(path)
    assert pending.key == content_key(path.read_bytes())
    np.testing.assert_array_equal(pending.decode(), _rgb())
