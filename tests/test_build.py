"""The builder: config sections and the library parameters built from them cannot drift apart."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

import pytest

from sppdet import build
from sppdet import config as C
from sppdet.config import Config, FeatureConfig, FinetuneConfig, SVMConfig
from sppdet.detect import postprocess
from sppdet.models import build_backbone
from sppdet.train.finetune import FinetuneParams
from sppdet.train.svm import SVMParams


def _changed(section):
    """A copy of a config section with every field set to a value other than its default
    (still a valid setting), so a field that does not arrive is noticed."""
    hints = typing.get_type_hints(type(section))
    values = {}
    for f in dataclasses.fields(section):
        v = getattr(section, f.name)
        tp = hints[f.name]
        if isinstance(v, bool):
            values[f.name] = not v
        elif isinstance(v, int):
            values[f.name] = v + 3
        elif isinstance(v, float):
            values[f.name] = v * 0.5 if v > 0 else v - 0.25
        elif isinstance(v, list):
            values[f.name] = [x + 1 for x in v]
        elif v is None and float in typing.get_args(tp):
            values[f.name] = 0.4
        elif isinstance(v, str) or v is None:
            values[f.name] = v
        else:
            values[f.name] = v
    return dataclasses.replace(section, **values)


@pytest.mark.parametrize("section_cls, params_cls", [(FinetuneConfig, FinetuneParams), (SVMConfig, SVMParams)])
def test_params_have_every_config_field_with_the_same_default(section_cls, params_cls):
    cfg_fields = {f.name: f for f in dataclasses.fields(section_cls)}
    par_fields = {f.name: f for f in dataclasses.fields(params_cls)}
    missing = sorted(set(cfg_fields) - set(par_fields))
    assert not missing, f"{params_cls.__name__} lacks {missing}"
    section = section_cls()
    extra = {"iterations": 7} if params_cls is FinetuneParams else {}
    params = params_cls(**extra)
    for name in cfg_fields:
        if name in extra:
            continue
        assert getattr(params, name) == getattr(section, name), name


@pytest.mark.parametrize("section_cls, params_cls, extra", [
    (FinetuneConfig, FinetuneParams, {"iterations": 11, "seed": 5, "flip": False}),
    (SVMConfig, SVMParams, {"device": "cpu", "seed": 5}),
])
def test_every_config_value_reaches_the_library(section_cls, params_cls, extra):
    section = _changed(section_cls())
    if section_cls is SVMConfig:
        # keep the changed values a valid SVM setting
        section = dataclasses.replace(section, features="spp", solver="torch",
                                      evict_threshold=section.hard_threshold - 0.2)
    params = build.params(params_cls, section, **extra)
    for f in dataclasses.fields(section):
        want = extra.get(f.name, getattr(section, f.name))
        assert getattr(params, f.name) == want, f.name
    default = section_cls()
    changed = [f.name for f in dataclasses.fields(section) if getattr(section, f.name) != getattr(default, f.name)]
    assert len(changed) >= len(dataclasses.fields(section)) - 3      # the check above is not vacuous


def test_a_renamed_config_field_is_an_error_not_a_silent_default():
    @dataclasses.dataclass
    class Renamed(SVMConfig):
        cost: float = 0.5            # as if SVMConfig.C had been renamed on the config side only

    with pytest.raises(TypeError, match="cost"):
        build.params(SVMParams, Renamed())


#: FeatureConfig fields that are not the extractor's: how they are used instead.
NOT_EXTRACTOR = {"backbone": "build.backbone", "weights": "build.backbone", "flip": "training views",
                 "pooled_memory_gb": "WindowFeatures"}


def test_every_feature_setting_reaches_the_extractor_or_is_accounted_for():
    f = FeatureConfig(scales=[96, 128], max_side=400, pyramid=[3, 1], cache_dtype="float32", mode="spp",
                      rcnn_size=200, rcnn_context=10, rcnn_batch=7, memory_cache=5, context=1.5,
                      context_pyramid=[1], amp="bf16")
    ex = build.extractor(f, build_backbone("zf5", "random"), "cpu", Path("/nonexistent-cache"))
    got = {"scales": list(ex.scales), "max_side": ex.max_side, "pyramid": list(ex.pyramid),
           "cache_dtype": ex.cache_dtype, "mode": ex.mode, "rcnn_size": ex.rcnn_size,
           "rcnn_context": ex.rcnn_context, "rcnn_batch": ex.rcnn_batch, "memory_cache": ex.cache._mem_size,
           "context": ex.context, "context_pyramid": list(ex.context_pyramid), "amp": ex.amp}
    assert set(got) | set(NOT_EXTRACTOR) == {x.name for x in dataclasses.fields(FeatureConfig)}
    for name, value in got.items():
        assert value == getattr(f, name), name
    assert ex.cache_dir == Path("/nonexistent-cache") / "features"
    # and the extractor's keyword defaults are the config's (no second set of defaults)
    sig = inspect.signature(type(ex).__init__).parameters
    d = FeatureConfig()
    assert sig["max_side"].default == d.max_side and list(sig["pyramid"].default) == d.pyramid
    assert sig["rcnn_size"].default == d.rcnn_size and sig["rcnn_context"].default == d.rcnn_context
    assert sig["amp"].default == d.amp


def test_postprocess_settings_are_the_test_section():
    """The model's ``test`` section is passed to postprocess by name: the names must exist there."""
    sig = inspect.signature(postprocess).parameters
    used = {"nms", "max_per_image", "score_threshold", "box_voting"}
    assert used <= set(sig) and used <= {f.name for f in dataclasses.fields(C.TestConfig)}
    assert all(sig[n].default == getattr(C.TestConfig(), n) for n in used)


def test_cache_dir_expands_tilde_and_prefers_the_caller(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SPPDET_CACHE", "~/env-cache")
    assert build.cache_dir("~/mine") == tmp_path / "mine"
    assert build.cache_dir(None) == tmp_path / "env-cache"
    monkeypatch.delenv("SPPDET_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert build.cache_dir() == tmp_path / ".cache" / "sppdet"
    assert build.training_cache_dir(Config(cache_dir="~/run-cache")) == tmp_path / "run-cache"
