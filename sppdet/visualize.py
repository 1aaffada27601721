"""Drawing detections and ground truth on images (Pillow)."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def class_colour(label: int, n: int) -> tuple[int, int, int]:
    """A distinct, saturated colour per class."""
    h = (label * 0.618033988749895) % 1.0 if n > 8 else label / max(n, 1)
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray | None,
                    classes: list[str], *, gt_boxes: np.ndarray | None = None,
                    gt_labels: np.ndarray | None = None) -> Image.Image:
    """Draw labelled boxes on a copy of ``image`` (ndarray[H, W, 3] uint8 RGB).

    Detections are drawn in a colour per class with "class score" labels;
    ground truth, when given, in dashed white-on-black outlines underneath.
    Boxes are (x1, y1, x2, y2) continuous pixels.
    """
    img = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    draw = ImageDraw.Draw(img)
    w, h = img.size
    lw = max(2, round(min(w, h) / 200))
    font = _font(max(11, round(min(w, h) / 30)))
    if gt_boxes is not None:
        for b in np.asarray(gt_boxes).reshape(-1, 4):
            x1, y1, x2, y2 = [float(v) for v in b]
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=(0, 0, 0), width=lw + 2)
            _dashed_rect(draw, (x1, y1, x2 - 1, y2 - 1), (255, 255, 255), lw)
    for i, b in enumerate(np.asarray(boxes).reshape(-1, 4)):
        lab = int(labels[i])
        col = class_colour(lab, len(classes))
        x1, y1, x2, y2 = [float(v) for v in b]
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=col, width=lw)
        text = classes[lab] if lab < len(classes) else str(lab)
        if scores is not None:
            text += f" {float(scores[i]):.2f}"
        tb = draw.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw + 4, ty + th + 4], fill=col)
        draw.text((x1 + 2, ty + 1), text, fill=(0, 0, 0), font=font)
    return img


def _dashed_rect(draw: ImageDraw.ImageDraw, box, colour, width: int, dash: int = 6) -> None:
    x1, y1, x2, y2 = box
    for (ax, ay, bx, by) in ((x1, y1, x2, y1), (x2, y1, x2, y2), (x2, y2, x1, y2), (x1, y2, x1, y1)):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(int(length // dash), 1)
        for s in range(0, steps, 2):
            t0, t1 = s / steps, min((s + 1) / steps, 1.0)
            draw.line([ax + (bx - ax) * t0, ay + (by - ay) * t0, ax + (bx - ax) * t1, ay + (by - ay) * t1],
                      fill=colour, width=width)


def save_image(img: Image.Image, path: str | Path, quality: int = 90) -> Path:
    """Write ``img`` to ``path`` atomically (format from the suffix; a full disk is a one-line error)."""
    import io

    from .utils.io import atomic_write_bytes

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=quality) if fmt == "JPEG" else img.save(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())
    return path
