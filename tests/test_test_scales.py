"""``test.scales``: testing a trained detector at other scales than it was trained at (the
paper's 1-scale / 5-scale rows without retraining)."""
import numpy as np
import pytest

from sppdet.config import ConfigError


def _image(tiny_run):
    imgs = sorted((tiny_run["data"] / "JPEGImages").glob("*.jpg"))
    return imgs[0]


def test_test_scales_change_only_the_extractor(tiny_run):
    from sppdet.build import detector_setup

    plain = detector_setup(tiny_run["checkpoint"], cache=tiny_run["cache"])
    same = detector_setup(tiny_run["checkpoint"], cache=tiny_run["cache"], test_overrides={"scales": [160]})
    multi = detector_setup(tiny_run["checkpoint"], cache=tiny_run["cache"], test_overrides={"scales": [128, 224]})
    assert plain.extractor.scales == (160,) == same.extractor.scales
    assert multi.extractor.scales == (128, 224)
    # the model (what was trained) keeps its own feature settings; only the maps change
    assert multi.model.features.scales == [160]
    assert multi.config.test.scales == [128, 224]


def test_detections_follow_the_test_scales(tiny_run):
    from sppdet.detect import Detector

    img = _image(tiny_run)
    kw = dict(cache_dir=tiny_run["cache"])
    a = Detector.from_checkpoint(tiny_run["checkpoint"], **kw)(img)
    b = Detector.from_checkpoint(tiny_run["checkpoint"], test_overrides={"scales": [160]}, **kw)(img)
    c = Detector.from_checkpoint(tiny_run["checkpoint"], test_overrides={"scales": [96, 288]}, **kw)(img)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])       # the training scale: the same detections
    assert len(c["boxes"]) and not (len(a["boxes"]) == len(c["boxes"]) and np.array_equal(a["scores"], c["scores"]))


@pytest.mark.parametrize("bad", [[], [0], [-5], [224.5]])
def test_bad_test_scales_are_refused(tiny_run, bad):
    from sppdet.build import detector_setup

    with pytest.raises(ConfigError, match="test.scales"):
        detector_setup(tiny_run["checkpoint"], cache=tiny_run["cache"], test_overrides={"scales": bad})
