"""Image decoding: modes, EXIF orientation, sniffed formats, broken files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import shared_dataset
from sppdet.data.images import find_image, image_size, load_image
from sppdet.errors import ImageDecodeError


def _pattern(h: int = 24, w: int = 36) -> np.ndarray:
    """An asymmetric RGB test image (every pixel distinct enough to tell orientations apart)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 7) % 256, (y * 11) % 256, ((x + 3 * y) * 5) % 256], axis=2).astype(np.uint8)


def _save(arr_or_img, path, fmt, **kw):
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    img.save(path, format=fmt, **kw)
    return path


# --- reference transforms, written out by hand (EXIF 2.3 orientation meanings) ---------

def _ref_orient(a: np.ndarray, o: int) -> np.ndarray:
    """The upright image for stored pixels ``a`` with EXIF orientation ``o`` (slow, explicit)."""
    h, w = a.shape[:2]
    if o in (1, 2, 3, 4):
        out = np.empty_like(a)
        for r in range(h):
            for c in range(w):
                sr, sc = r, c
                if o in (2, 3):
                    sc = w - 1 - c
                if o in (3, 4):
                    sr = h - 1 - r
                out[r, c] = a[sr, sc]
        return out
    out = np.empty((w, h) + a.shape[2:], dtype=a.dtype)
    for r in range(w):          # output row r, column c
        for c in range(h):
            if o == 5:          # transpose
                sr, sc = c, r
            elif o == 6:        # rotate 90 clockwise
                sr, sc = h - 1 - c, r
            elif o == 7:        # transverse
                sr, sc = h - 1 - c, w - 1 - r
            else:               # 8: rotate 90 counter-clockwise
                sr, sc = c, w - 1 - r
            out[r, c] = a[sr, sc]
    return out


def test_rgb_png_roundtrip(tmp_path):
    a = _pattern()
    p = _save(a, tmp_path / "x.png", "PNG")
    out = load_image(p)
    assert out.dtype == np.uint8 and out.shape == (24, 36, 3)
    np.testing.assert_array_equal(out, a)
    assert image_size(p) == (36, 24)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg(tmp_path, orientation):
    a = _pattern()
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = _save(a, tmp_path / f"o{orientation}.jpg", "JPEG", exif=exif.tobytes(), quality=100,
              subsampling=0)
    stored = np.asarray(Image.open(p).convert("RGB"))  # raw decoded pixels, no rotation
    out = load_image(p)
    expected = _ref_orient(stored, orientation)
    np.testing.assert_array_equal(out, expected)
    assert image_size(p) == (out.shape[1], out.shape[0])
    if orientation >= 5:
        assert out.shape[:2] == (36, 24)


def test_exif_orientation_png(tmp_path):
    a = _pattern()
    exif = Image.Exif()
    exif[0x0112] = 6
    p = _save(a, tmp_path / "o6.png", "PNG", exif=exif.tobytes())
    out = load_image(p)
    np.testing.assert_array_equal(out, _ref_orient(a, 6))
    assert image_size(p) == (24, 36)


def test_bad_orientation_value_ignored(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 42
    a = _pattern()
    p = _save(a, tmp_path / "o42.png", "PNG", exif=exif.tobytes())
    np.testing.assert_array_equal(load_image(p), a)


def test_grayscale_to_rgb(tmp_path):
    g = (np.arange(24 * 36).reshape(24, 36) % 256).astype(np.uint8)
    p = _save(g, tmp_path / "g.png", "PNG")
    out = load_image(p)
    assert out.shape == (24, 36, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g)


def test_bilevel_to_rgb(tmp_path):
    g = np.zeros((10, 12), dtype=bool)
    g[2:5, 3:9] = True
    p = _save(Image.fromarray(g), tmp_path / "b.png", "PNG")
    out = load_image(p)
    np.testing.assert_array_equal(out[:, :, 1], np.where(g, 255, 0))


def test_palette_to_rgb(tmp_path):
    a = _pattern()
    img = Image.fromarray(a).quantize(colors=16)
    palette = np.array(img.getpalette()[: 16 * 3], dtype=np.uint8).reshape(-1, 3)
    idx = np.asarray(img)
    p = _save(img, tmp_path / "p.png", "PNG")
    out = load_image(p)
    expected = np.zeros_like(a)
    for r in range(a.shape[0]):
        for c in range(a.shape[1]):
            expected[r, c] = palette[idx[r, c]]
    np.testing.assert_array_equal(out, expected)


def _ref_over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1 - a)


def test_rgba_composited_on_white(tmp_path):
    a = _pattern()
    alpha = np.zeros(a.shape[:2], np.uint8)
    alpha[:, :12] = 255
    alpha[:, 12:24] = 128
    rgba = np.concatenate([a, alpha[..., None]], axis=2)
    p = _save(rgba, tmp_path / "a.png", "PNG")
    out = load_image(p).astype(np.float64)
    ref = _ref_over_white(a, alpha)
    assert np.abs(out - ref).max() <= 1.0
    assert (out[:, 24:] == 255).all()          # fully transparent -> white
    np.testing.assert_array_equal(out[:, :12], a[:, :12])


def test_la_composited_on_white(tmp_path):
    g = np.full((8, 8), 40, np.uint8)
    alpha = np.zeros((8, 8), np.uint8)
    alpha[:4] = 255
    p = _save(Image.fromarray(np.stack([g, alpha], 2), mode="LA"), tmp_path / "la.png", "PNG")
    out = load_image(p)
    assert (out[:4] == 40).all() and (out[4:] == 255).all()


def test_palette_with_transparency(tmp_path):
    idx = np.zeros((6, 6), np.uint8)
    idx[:3] = 1
    img = Image.fromarray(idx, mode="P")
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    p = _save(img, tmp_path / "pt.png", "PNG", transparency=0)
    out = load_image(p)
    np.testing.assert_array_equal(out[:3], np.broadcast_to([200, 10, 10], (3, 6, 3)))
    assert (out[3:] == 255).all()


def test_cmyk_jpeg_to_rgb(tmp_path):
    a = _pattern()
    cmyk = Image.fromarray(a).convert("CMYK")
    p = _save(cmyk, tmp_path / "c.jpg", "JPEG", quality=100)
    with Image.open(p) as im:
        assert im.mode == "CMYK"
    out = load_image(p)
    assert out.shape == (24, 36, 3)
    # Pillow's RGB->CMYK->RGB is lossless up to JPEG error
    assert np.abs(out.astype(int) - a.astype(int)).mean() < 6


def test_16bit_grayscale_scaled(tmp_path):
    g16 = (np.arange(20 * 30).reshape(20, 30) * 109 % 65536).astype(np.uint16)
    p = _save(Image.fromarray(g16), tmp_path / "g16.png", "PNG")
    out = load_image(p)
    ref = np.empty((20, 30), np.uint8)
    for r in range(20):
        for c in range(30):
            ref[r, c] = int(int(g16[r, c]) * 255 / 65535 + 0.5)
    for ch in range(3):
        np.testing.assert_array_equal(out[:, :, ch], ref)


def test_16bit_rgb_png(tmp_path):
    import cv2

    rng = np.random.default_rng(3)
    a = rng.integers(0, 65536, (10, 12, 3)).astype(np.uint16)   # RGB
    p = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(p), a[:, :, ::-1])                   # OpenCV writes BGR
    out = load_image(p).astype(np.int64)
    ref = np.empty(a.shape, np.int64)
    for idx in np.ndindex(*a.shape):
        ref[idx] = round(int(a[idx]) * 255 / 65535)
    assert out.shape == (10, 12, 3)
    assert np.abs(out - ref).max() <= 1                         # high byte vs rounding: off by <= 1


def test_16bit_tiff(tmp_path):
    g = (np.arange(120).reshape(10, 12) * 500).astype(np.uint16)
    p = _save(Image.fromarray(g), tmp_path / "g16.tif", "TIFF")
    out = load_image(p)
    for r in range(10):
        for c in range(12):
            assert out[r, c, 0] == out[r, c, 2] == round(int(g[r, c]) * 255 / 65535)


def test_png_saved_as_jpg_loads(tmp_path):
    a = _pattern()
    p = _save(a, tmp_path / "really_png.jpg", "PNG")
    np.testing.assert_array_equal(load_image(p), a)
    assert image_size(p) == (36, 24)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jpg"
    with pytest.raises(ImageDecodeError) as ei:
        load_image(p)
    msg = str(ei.value)
    assert str(p) in msg and "no such image file" in msg and "\n" not in msg
    with pytest.raises(ImageDecodeError, match="no such image file"):
        image_size(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty image file") as ei:
        load_image(p)
    assert str(p) in str(ei.value)


def test_not_an_image(tmp_path):
    p = tmp_path / "text.jpg"
    p.write_text("hello, I am not a JPEG\n" * 10)
    with pytest.raises(ImageDecodeError) as ei:
        load_image(p)
    msg = str(ei.value)
    assert str(p) in msg and "not a recognised image format" in msg and "\n" not in msg


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_jpeg_is_an_error(tmp_path, keep):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    p = tmp_path / "trunc.jpg"
    p.write_bytes(data[: int(len(data) * keep)])
    assert image_size(p) == (160, 120)    # the header is intact
    with pytest.raises(ImageDecodeError) as ei:
        load_image(p)
    msg = str(ei.value)
    assert str(p) in msg and "truncated" in msg and "\n" not in msg
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_refused_even_if_flag_set_globally(tmp_path, monkeypatch):
    a = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG")
    p = tmp_path / "t.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_image(p)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_corrupt_jpeg_body(tmp_path):
    a = _pattern(64, 64)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    # keep the header, replace the entropy-coded data with zeros, drop the end
    data[400:] = b"\x00" * (len(data) - 400)
    p = tmp_path / "corrupt.jpg"
    p.write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError) as ei:
        load_image(p)
    assert str(p) in str(ei.value) and "cannot decode image" in str(ei.value)


def test_gif_first_frame(tmp_path):
    f1 = Image.fromarray(np.full((8, 8, 3), 10, np.uint8))
    f2 = Image.fromarray(np.full((8, 8, 3), 250, np.uint8))
    p = tmp_path / "anim.gif"
    f1.save(p, save_all=True, append_images=[f2])
    out = load_image(p)
    assert out.shape == (8, 8, 3) and out.max() < 50


def test_find_image(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    assert find_image(tmp_path / "a") == tmp_path / "a.png"
    assert find_image(tmp_path / "b") == tmp_path / "b.jpg"
    assert find_image(tmp_path / "c") is None


def test_raccoon_grayscale_loads_as_rgb():
    root = shared_dataset("raccoon")
    for stem in ("raccoon-150", "raccoon-152", "raccoon-161"):
        p = root / "JPEGImages" / f"{stem}.jpg"
        assert Image.open(p).mode == "L"
        out = load_image(p)
        assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8
        assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()
        assert image_size(p) == (out.shape[1], out.shape[0])
