"""ImageNet weights for the paper's backbones: where they live, fetching, the ZFNet conversion.

Building a network never downloads (:func:`~sppdet.models.backbones.build_backbone`
reads local files only); ``sppdet weights fetch vgg16|zf5`` is the one step
that touches the network, and it writes only into the usual caches:

* ``vgg16``: ``<torch hub>/checkpoints/vgg16-397923af.pth``, torchvision's
  ``VGG16_Weights.IMAGENET1K_V1`` (SHA-256 prefix in the name checked, torch.hub's rule);
* ``zf5``: ``~/.torch/models/zfnet-1727-d010ddca.pth``, pytorchcv's model store file of
  ``zfnet`` (its full SHA-1 checked), converted to
  ``<torch hub>/checkpoints/sppdet-zf5-zfnet-d010ddca.pt`` (conv1-5, with its layout) and
  ``sppdet-zf5-zfnet-d010ddca-fc.pt`` (fc6/fc7).

``<torch hub>`` is ``torch.hub.get_dir()`` (``$TORCH_HOME/hub``, by default
``~/.cache/torch/hub``); ``~/.torch/models`` is pytorchcv's default model root.
The converted files are named by the SHA-1 prefix of the pytorchcv file they
come from, so a new store release never mixes with an old one.

The pytorchcv store entry is pinned here (:data:`ZFNET_STORE`, the entry of
pytorchcv 0.0.74); pytorchcv itself is an optional dependency used by the
tests as the reference implementation, not needed to fetch or convert.

ZFNet -> sppdet ``zf5-zfnet``: ``features.stage1.unit1.conv`` -> ``conv1``,
``stage2.unit1`` -> ``conv2``, ``stage3.unit1..3`` -> ``conv3..5``;
``output.fc1.fc`` -> ``fc6`` (9216 inputs in torch's ``(C, 6, 6)`` flatten
order, the order of sppdet's one-level ``{6}`` pyramid feature),
``output.fc2.fc`` -> ``fc7``; the 1000-way ``output.fc3`` is dropped.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import sys
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from ..errors import SppdetError
from ..utils.io import atomic_path, file_sha1
from .backbones import WeightsError, load_weight_file

log = logging.getLogger(__name__)

#: Names ``sppdet weights fetch`` accepts.
FETCHABLE = ("vgg16", "zf5")

#: Format tag of the converted ZF-5 conv file.
ZF5_FORMAT = "sppdet-zf5-imagenet/1"


@dataclass(frozen=True)
class StoreEntry:
    """One model of pytorchcv's model store (a row of its ``model_metainfos.csv``)."""

    name: str
    error: str          # top-1 error x 1e4, part of the file name
    sha1: str
    release: str
    repo_url: str = "https://github.com/osmr/imgclsmob"

    @property
    def file_name(self) -> str:
        return f"{self.name}-{self.error}-{self.sha1[:8]}.pth"

    @property
    def url(self) -> str:
        return f"{self.repo_url}/releases/download/{self.release}/{self.file_name}.zip"


#: pytorchcv 0.0.74's ``zfnet`` entry (ImageNet-1K; ``error`` as its file name spells it).
ZFNET_STORE = StoreEntry("zfnet", "1727", "d010ddca1eb32a50a8cceb475c792f53e769b631", "v0.0.395")

#: pytorchcv's key prefix -> sppdet's zf5 module.
ZFNET_CONV_KEYS = {
    "features.stage1.unit1.conv": "conv1",
    "features.stage2.unit1.conv": "conv2",
    "features.stage3.unit1.conv": "conv3",
    "features.stage3.unit2.conv": "conv4",
    "features.stage3.unit3.conv": "conv5",
}
ZFNET_FC_KEYS = {"output.fc1.fc": "fc6", "output.fc2.fc": "fc7"}


class FetchError(SppdetError):
    """Weights could not be downloaded (no network, server error, checksum mismatch)."""


# ---------------------------------------------------------------------------
# Where the files are


def hub_checkpoints_dir() -> Path:
    """torch hub's checkpoint folder (where torchvision's weights API caches its files)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def pytorchcv_root() -> Path:
    """pytorchcv's default model root (``get_model_file``'s ``~/.torch/models``)."""
    return Path(os.path.join("~", ".torch", "models")).expanduser()


def vgg16_file() -> Path:
    """torchvision's cache file of ``VGG16_Weights.IMAGENET1K_V1``."""
    from .backbones import _torchvision_vgg16_cache_file

    return _torchvision_vgg16_cache_file()


def zfnet_raw_file(entry: StoreEntry | None = None) -> Path:
    """pytorchcv's file of ZFNet's ImageNet weights (as its model store names it)."""
    return pytorchcv_root() / (entry or ZFNET_STORE).file_name


def zf5_imagenet_file(entry: StoreEntry | None = None) -> Path:
    """The converted ZF-5 conv weights (``features.weights: imagenet`` for ``zf5``)."""
    return hub_checkpoints_dir() / f"sppdet-zf5-zfnet-{(entry or ZFNET_STORE).sha1[:8]}.pt"


def zf5_fc_file(conv_file: str | Path) -> Path:
    """The fc6/fc7 file written beside a converted ZF-5 conv file."""
    p = Path(conv_file)
    return p.with_name(p.stem + "-fc.pt")


def fetch_command(name: str) -> str:
    return f"sppdet weights fetch {name}"


# ---------------------------------------------------------------------------
# Conversion


def convert_zfnet(sd: dict[str, torch.Tensor], source: str = "zfnet") -> tuple[dict[str, torch.Tensor],
                                                                              dict[str, torch.Tensor]]:
    """pytorchcv ``zfnet`` state_dict -> (sppdet ``zf5`` conv state_dict, ``{fc6,fc7}.{weight,bias}``).

    Raises:
        WeightsError: a key is missing or a tensor has the wrong shape (one line, naming ``source``).
    """
    shapes = {"conv1": (96, 3, 7, 7), "conv2": (256, 96, 5, 5), "conv3": (384, 256, 3, 3),
              "conv4": (384, 384, 3, 3), "conv5": (256, 384, 3, 3), "fc6": (4096, 9216), "fc7": (4096, 4096)}
    conv: dict[str, torch.Tensor] = {}
    fc: dict[str, torch.Tensor] = {}
    for table, out in ((ZFNET_CONV_KEYS, conv), (ZFNET_FC_KEYS, fc)):
        for src, dst in table.items():
            for part in ("weight", "bias"):
                k = f"{src}.{part}"
                if k not in sd:
                    raise WeightsError(f"{source}: not a pytorchcv zfnet state_dict (missing {k})")
                v = sd[k]
                want = shapes[dst] if part == "weight" else shapes[dst][:1]
                if tuple(v.shape) != want:
                    raise WeightsError(f"{source}: {k} has shape {tuple(v.shape)}, expected {want} (zfnet)")
                out[f"{dst}.{part}"] = v.detach().to(torch.float32).contiguous().clone()
    return conv, fc


def save_converted_zf5(conv: dict[str, torch.Tensor], fc: dict[str, torch.Tensor], conv_file: str | Path,
                       source: str, source_sha1: str) -> tuple[Path, Path]:
    """Write the converted conv file (with its layout) and the fc6/fc7 file, atomically."""
    conv_file = Path(conv_file)
    fc_file = zf5_fc_file(conv_file)
    payload = {"format": ZF5_FORMAT, "layout": "zfnet", "source": source, "source_sha1": source_sha1,
               "state_dict": conv}
    try:
        with atomic_path(fc_file) as tmp:
            torch.save({"format": ZF5_FORMAT, "source": source, "source_sha1": source_sha1,
                        "state_dict": fc}, tmp)
        with atomic_path(conv_file) as tmp:
            torch.save(payload, tmp)
    except OSError as e:
        raise WeightsError(f"{conv_file.parent}: cannot write the converted zf5 weights "
                           f"({e.strerror or e})") from None
    return conv_file, fc_file


def zf5_file_layout(path: str | Path) -> str:
    """``"zfnet"`` for a file written by :func:`save_converted_zf5`, else ``"paper"``.

    Unreadable files give ``"paper"``; the loader reports them properly.
    """
    try:
        obj: Any = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return "paper"
    if isinstance(obj, dict) and obj.get("format") == ZF5_FORMAT and obj.get("layout") == "zfnet":
        return "zfnet"
    return "paper"


def load_zf5_fc(conv_file: str | Path) -> dict[str, torch.Tensor]:
    """ImageNet fc6/fc7 (``fc6.weight`` [4096, 9216], ``fc6.bias``, ``fc7.weight`` [4096, 4096],
    ``fc7.bias``) stored beside a converted ZF-5 conv file."""
    f = zf5_fc_file(conv_file)
    sd = load_weight_file(f, "zf5 fc6/fc7")
    want = {"fc6.weight": (4096, 9216), "fc6.bias": (4096,), "fc7.weight": (4096, 4096), "fc7.bias": (4096,)}
    for k, shape in want.items():
        if k not in sd or tuple(sd[k].shape) != shape:
            raise WeightsError(f"{f}: not zf5 fc6/fc7 weights (need {k} of shape {shape}); "
                               f"rerun {fetch_command('zf5')}")
    return {k: sd[k] for k in want}


# ---------------------------------------------------------------------------
# Fetching


def _progress_enabled() -> bool:
    env = os.environ.get("SPPDET_PROGRESS")
    return env == "1" if env in ("0", "1") else sys.stderr.isatty()


def _download(url: str, dst: Path, hash_prefix: str | None = None, place: Path | None = None) -> None:
    """Download ``url`` to ``dst`` (torch.hub's downloader: temp file, progress bar, SHA-256 prefix).

    Folders it had to create are removed again when the download fails; ``place``
    is the file the error message suggests copying by hand (default ``dst``).
    """
    host = urlparse(url).hostname or url
    created = [d for d in (dst.parent, *dst.parent.parents) if not d.exists()]
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"{dst.parent}: cannot create the weights folder ({e.strerror or e})") from None
    log.info("downloading %s -> %s", url, dst)
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=hash_prefix, progress=_progress_enabled())
    except BaseException as e:
        for d in created:                     # deepest first: only the empty folders made here
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(e, urllib.error.HTTPError):
            raise FetchError(f"{url}: download failed (HTTP {e.code} {e.reason})") from None
        if isinstance(e, (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
                          TimeoutError)):
            reason = getattr(e, "reason", None) or e
            raise FetchError(f"could not reach {host} to download {url} ({reason}); run it where {host} can "
                             f"be reached, or put the file at {place or dst} by hand and rerun") from None
        if isinstance(e, RuntimeError):   # torch.hub: 'invalid hash value (expected ..., got ...)'
            raise FetchError(f"{url}: the downloaded file fails its checksum "
                             f"({str(e).splitlines()[0][:160]})") from None
        if isinstance(e, OSError):
            raise FetchError(f"{dst}: cannot write the download ({e.strerror or e})") from None
        raise


def _sha256_prefix_ok(path: Path) -> bool:
    m = re.search(r"-([a-f0-9]*)\.", path.name)
    if not m:
        return True
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest().startswith(m.group(1))


def fetch_vgg16() -> list[Path]:
    """torchvision's ``VGG16_Weights.IMAGENET1K_V1`` into torch hub's cache (hash prefix checked)."""
    import torchvision

    url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    f = vgg16_file()
    if f.is_file():
        if _sha256_prefix_ok(f):
            log.info("vgg16: %s is present and matches its checksum", f)
            return [f]
        log.warning("vgg16: %s does not match its checksum; downloading it again", f)
    m = re.search(r"-([a-f0-9]*)\.", f.name)
    _download(url, f, hash_prefix=m.group(1) if m else None)
    return [f]


def _fetch_zfnet_raw(entry: StoreEntry) -> Path:
    raw = zfnet_raw_file(entry)
    if raw.is_file():
        if file_sha1(raw) == entry.sha1:
            log.info("zf5: %s is present and matches its SHA-1", raw)
            return raw
        log.warning("zf5: %s does not match SHA-1 %s; downloading it again", raw, entry.sha1)
    zip_path = raw.with_name(raw.name + ".zip")
    _download(entry.url, zip_path, place=raw)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            if entry.file_name not in zf.namelist():
                raise FetchError(f"{entry.url}: the archive has no {entry.file_name}")
            with atomic_path(raw) as tmp, zf.open(entry.file_name) as src, open(tmp, "wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    out.write(chunk)
    except zipfile.BadZipFile:
        raise FetchError(f"{entry.url}: the download is not a zip archive") from None
    finally:
        zip_path.unlink(missing_ok=True)
    got = file_sha1(raw)
    if got != entry.sha1:
        raw.unlink(missing_ok=True)
        raise FetchError(f"{entry.url}: {entry.file_name} has SHA-1 {got}, expected {entry.sha1} (removed)")
    return raw


def fetch_zf5(entry: StoreEntry | None = None) -> list[Path]:
    """pytorchcv's ImageNet ZFNet (SHA-1 checked), converted to sppdet's ``zf5-zfnet`` files."""
    entry = entry or ZFNET_STORE
    raw = _fetch_zfnet_raw(entry)
    conv_file = zf5_imagenet_file(entry)
    conv, fc = convert_zfnet(load_weight_file(raw, "pytorchcv zfnet"), str(raw))
    conv_file, fc_file = save_converted_zf5(conv, fc, conv_file, source=f"pytorchcv {entry.file_name}",
                                            source_sha1=entry.sha1)
    log.info("zf5: converted %s -> %s (+ %s)", raw, conv_file, fc_file.name)
    return [raw, conv_file, fc_file]


def fetch(name: str) -> list[Path]:
    """Fetch (download where needed, check, convert) the ImageNet weights of ``vgg16`` or ``zf5``."""
    key = str(name).lower()
    if key == "vgg16":
        return fetch_vgg16()
    if key in ("zf5", "zf5-zfnet", "zfnet"):
        return fetch_zf5()
    raise SppdetError(f"weights {name!r}: nothing to fetch (choose from {', '.join(FETCHABLE)}; "
                      "lite0's weights are packaged)")


def weight_files() -> list[tuple[str, str, Path]]:
    """(backbone, what, path) of every file ``fetch`` writes, present or not."""
    conv = zf5_imagenet_file()
    return [("vgg16", "torchvision VGG16_Weights.IMAGENET1K_V1", vgg16_file()),
            ("zf5", "pytorchcv zfnet (raw)", zfnet_raw_file()),
            ("zf5", "converted conv1-5 (features.weights: imagenet)", conv),
            ("zf5", "converted fc6/fc7 (finetune.init: imagenet)", zf5_fc_file(conv))]


__all__ = ["FETCHABLE", "ZFNET_STORE", "StoreEntry", "FetchError", "convert_zfnet", "save_converted_zf5",
           "zf5_file_layout", "load_zf5_fc", "fetch", "fetch_vgg16", "fetch_zf5", "weight_files",
           "zf5_imagenet_file", "zf5_fc_file", "vgg16_file", "zfnet_raw_file", "hub_checkpoints_dir",
           "pytorchcv_root", "fetch_command"]
