"""Diagnostic: the conv5 stage of ``voc07_zf5_paper`` (random ZF-5 weights, nothing downloaded) on
the first N ``trainval`` images of a VOC root, with RSS and time recorded after every image, to
compare heap trimming on and off and see where the stage's peak is set (docs/DISTRIBUTED.md).

    SPPDET_MALLOC_TRIM=1 python scripts/probe_conv5_rss.py ROOT 40 a1.json   # then =0 into b1.json

It wraps a private method of the extractor (``_finish_precompute``, called once per image by the
2-thread CPU path), so it is a measuring aid tied to this version of the code, not an API.  Maps go
to a temporary folder under the output file's folder, removed at the end."""
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from sppdet import build
from sppdet.config import load_config
from sppdet.data import load_voc
from sppdet.data.records import Dataset
from sppdet.features import extractor as ex

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

root, n, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = load_config("voc07_zf5_paper", overrides={"features": {"weights": "random"}})
ds = load_voc(root, "trainval")
ds = Dataset(ds.name, ds.split, ds.classes, ds.records[:n], ds.root)
out = []
orig = ex.FeatureExtractor._finish_precompute
def finish(self, item, flip, pbar):
    r = orig(self, item, flip, pbar)
    rec = item[0]
    out.append({"i": len(out), "id": rec.image_id, "px": rec.width * rec.height, "t": time.perf_counter(),
                "rss": round(rss_mb(), 1), "peak": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    return r
ex.FeatureExtractor._finish_precompute = finish
bb = build.backbone(cfg)
with tempfile.TemporaryDirectory(dir=Path(out_path).resolve().parent) as d:
    e = build.extractor(cfg.features, bb, "cpu", Path(d))
    t0 = time.perf_counter()
    e.precompute(ds, flip=False, progress=False)
    dt = time.perf_counter() - t0
Path(out_path).write_text(json.dumps({"seconds": dt, "items": out}))
print(out_path, f"{dt:.1f} s, {dt / n:.2f} s/img, peak {max([o['peak'] for o in out] or [0])} MiB, last rss {(out[-1]['rss'] if out else 0)}")
