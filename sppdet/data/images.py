"""Robust image decoding: every image enters sppdet as ``ndarray[H, W, 3] uint8`` RGB.

* The format is sniffed from the bytes (Pillow), never from the file name, so a
  PNG saved as ``x.jpg`` loads.
* The EXIF ``Orientation`` tag is applied, so ``(H, W)`` is the size a viewer
  shows and the size the annotations should refer to.
* Modes are converted to RGB: grayscale (``L``, ``1``), palette (``P``),
  ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``; 16-bit and 32-bit grayscale
  (``I;16*``, ``I``, ``F``) are scaled to 8 bits (``v * 255 / 65535`` for
  16-bit data, rounded); 16-bit-per-channel RGB PNGs are decoded by Pillow to
  their high bytes (within 1 of the rounded scaling).  Images with an alpha channel (``RGBA``, ``LA``,
  ``PA``, ``P`` with a transparent colour) are **composited on white**: a
  transparent region becomes white, not black, which is how viewers and
  annotation tools display it.  Multi-frame files (GIF, TIFF) give their
  first frame.
* A missing, empty, truncated or corrupt file raises
  :class:`~sppdet.errors.ImageDecodeError` with a one-line message naming the
  file.  Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never switched on
  here: a truncated JPEG is an error, not a partly grey image.  (If some other
  code switched it on globally, :func:`load_image` still refuses truncated
  data: it decodes with the flag forced off.)

:func:`image_size` reads only the header (and EXIF block) and returns the same
``(width, height)`` that :func:`load_image` would produce, without decoding
the pixels.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import ImageDecodeError

logger = logging.getLogger(__name__)

# Pillow warns (DecompressionBombWarning, printed raw by the warnings module) when an image
# has more than Image.MAX_IMAGE_PIXELS pixels; _open logs that as one warning naming the file
# instead.  (A filter set once here: warnings.catch_warnings is not thread-safe.)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

#: File extensions looked for, in order, when an image id has no ``.jpg`` file.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG",
                                     ".bmp", ".tif", ".tiff", ".webp")

#: EXIF tag number of ``Orientation``.
_EXIF_ORIENTATION = 0x0112

#: EXIF orientation value -> the Pillow transpose that displays the image upright
#: (values 2-8 of the EXIF 2.3 specification; 1 is "already upright").
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Decode with ``ImageFile.LOAD_TRUNCATED_IMAGES`` off (restored afterwards).

    (No ``warnings.catch_warnings`` here: it is not thread-safe, and images are
    decoded from worker threads.)
    """
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _open(path: Path) -> Image.Image:
    """Open ``path`` lazily (header only); ImageDecodeError when it is not an image."""
    if not path.exists():
        raise ImageDecodeError(f"{path}: no such image file")
    if path.is_dir():
        raise ImageDecodeError(f"{path}: is a folder, not an image file")
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError(f"{path}: empty image file (0 bytes)")
        img = Image.open(path)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{path}: not a recognised image format (corrupt or not an image)") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{path}: image too large to decode safely ({_one_line(e)})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"{path}: cannot read image header ({_one_line(e)})") from None
    _warn_if_huge(path, img)
    return img


#: Files already warned about as very large (each is named once per process).
_HUGE_WARNED: set[str] = set()


def _warn_if_huge(path: Path, img: Image.Image) -> None:
    """One logged warning naming ``path`` when it has more pixels than Pillow's safety limit."""
    limit = Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if limit and w * h > limit and str(path) not in _HUGE_WARNED:
        _HUGE_WARNED.add(str(path))
        logger.warning("%s: very large image (%d x %d = %.0f megapixels, over Pillow's %.0f-megapixel safety "
                       "limit); decoding it needs about %.1f GB of memory", path, w, h, w * h / 1e6, limit / 1e6,
                       w * h * 3 / 1e9)


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8) of an opened image, read without decoding the pixels.

    PNG keeps EXIF in an ``eXIf`` chunk; only a chunk before the pixel data is
    visible before decoding, so that is the only one used (by both
    :func:`image_size` and :func:`load_image`, which therefore always agree).
    A missing or unreadable EXIF block means "upright" (1).
    """
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception as e:  # corrupt EXIF must not make a good image unreadable
        logger.debug("%s: ignoring unreadable EXIF data (%s)", getattr(img, "filename", "?"), e)
        return 1
    return value if value in _ORIENTATION_TRANSPOSE else 1


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any decoded Pillow image -> ndarray[H, W, 3] uint8 RGB (see the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode == "F" and a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0  # float images in [0, 1]
        elif mode != "F" and (mode.startswith("I;16") or (a.size and a.max() > 255)):
            a = a * (255.0 / 65535.0)  # 16-bit data
        g = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB.

    Args:
        path: the image file; its format is sniffed from the bytes.

    Returns:
        ndarray[H, W, 3] uint8, RGB, with the EXIF orientation applied (H and W
        are the displayed height and width, as :func:`image_size` reports).

    Raises:
        ImageDecodeError: missing, empty, truncated, corrupt or unsupported
            file; the one-line message names the file and the problem.
    """
    path = Path(path)
    with _strict_decoding():
        img = _open(path)
        try:
            with img:
                orientation = _orientation(img)
                try:
                    img.seek(0)
                except (EOFError, ValueError):
                    pass
                img.load()
                if orientation != 1:
                    img = img.transpose(_ORIENTATION_TRANSPOSE[orientation])
                arr = _to_rgb(img)
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageDecodeError(f"{path}: image too large to decode safely ({_one_line(e)})") from None
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, MemoryError) as e:
            msg = _one_line(e)
            what = "truncated image file" if "truncat" in msg.lower() else "corrupt image data"
            raise ImageDecodeError(f"{path}: cannot decode image: {what} ({msg})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"{path}: decoded to an unusable array of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image from its header, after EXIF orientation.

    Only the header and the EXIF block are read (fast; the pixels are not
    decoded, so a file truncated in its pixel data is not detected here).

    Raises:
        ImageDecodeError: missing, empty or unrecognised file.
    """
    path = Path(path)
    with _strict_decoding():
        img = _open(path)
        with img:
            w, h = img.size
            orientation = _orientation(img)
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"{path}: header gives an empty image size {w}x{h}")
    if orientation in (5, 6, 7, 8):  # the transposing orientations swap the axes
        w, h = h, w
    return int(w), int(h)


def find_image(stem_path: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Path | None:
    """The first existing ``stem_path + ext`` for ``ext`` in ``extensions`` (``None`` if none).

    ``stem_path`` is a path without extension, e.g. ``ROOT/JPEGImages/000001``.
    """
    stem_path = Path(stem_path)
    for ext in extensions:
        cand = stem_path.parent / (stem_path.name + ext)
        if cand.is_file():
            return cand
    return None
