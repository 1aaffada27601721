import pytest

from sppdet.config import Config, config_from_dict, load_config, parse_override, deep_update
from sppdet.errors import ConfigError


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_the_papers():
    cfg = Config()
    assert cfg.features.pyramid == [4, 2, 1]
    assert cfg.features.scales == [688]
    assert cfg.svm.C == 0.001 and cfg.svm.pos_weight == 2 and cfg.svm.bias_multiplier == 10
    assert cfg.svm.hard_threshold == -1.0001 and cfg.svm.evict_threshold == -1.2
    assert cfg.test.nms == 0.3 and cfg.test.max_per_image == 100
    assert cfg.finetune.fg_fraction == 0.25


def test_merge_nested_and_int_to_float(tmp_path):
    cfg = load_config(write(tmp_path, "svm:\n  C: 1\nfeatures:\n  scales: [480, 688]\n"))
    assert cfg.svm.C == 1.0 and isinstance(cfg.svm.C, float)
    assert cfg.features.scales == [480, 688]
    assert cfg.svm.pos_weight == 2.0  # untouched keys keep defaults


@pytest.mark.parametrize("text, needle", [
    ("svm:\n  CC: 1\n", "unknown key 'CC'"),
    ("bogus: 1\n", "unknown key 'bogus'"),
    ("svm:\n  C: fast\n", "config.svm.C: expected a number"),
    ("features:\n  scales: 688\n", "config.features.scales: expected a list"),
    ("finetune:\n  enabled: 1\n", "expected true or false"),
    ("features:\n  backbone: resnet\n", "features.backbone"),
    ("features:\n  pooled_memory_gb: -1\n", "features.pooled_memory_gb"),
    ("features:\n  context: 0.9\n", "features.context"),
    ("features:\n  context: 1.5\n  mode: rcnn\n", "features.context"),
    ("- a\n- b\n", "must be a mapping"),
    ("svm: [\n", "invalid YAML at line"),
])
def test_bad_configs_fail_loudly_naming_file_and_key(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value)
    if needle not in ("features.backbone", "features.pooled_memory_gb", "features.context"):
        assert str(p) in str(e.value)


def test_base_chain_and_override(tmp_path):
    write(tmp_path, "svm:\n  C: 0.5\nseed: 3\n", "base.yaml")
    p = write(tmp_path, "_base_: base.yaml\nsvm:\n  pos_weight: 4\n")
    cfg = load_config(p, parse_override("svm.C=0.25"))
    assert (cfg.svm.C, cfg.svm.pos_weight, cfg.seed) == (0.25, 4.0, 3)


def test_base_loop_is_an_error(tmp_path):
    write(tmp_path, "_base_: b.yaml\n", "a.yaml")
    write(tmp_path, "_base_: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_missing_config_names_bundled():
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("does/not/exist.yaml")


def test_round_trip_through_dict():
    cfg = load_config(None, {"features": {"backbone": "lite0"}, "svm": {"features": "spp"}})
    assert config_from_dict(cfg.to_dict()) == cfg


def test_parse_override_and_deep_update():
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    with pytest.raises(ConfigError):
        parse_override("novalue")
    assert deep_update({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_bundled_configs_load():
    from sppdet.config import CONFIG_DIR

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"demo_lite0", "voc07_zf5", "voc07_zf5_paper", "voc07_vgg16"} <= set(names)
    for n in names:
        cfg = load_config(n)
        assert cfg.name == n
    paper = load_config("voc07_zf5_paper")
    assert paper.features.pyramid == [6, 3, 2, 1]
    assert paper.features.scales == [480, 576, 688, 864, 1200]
    assert paper.features.backbone == "zf5" and paper.finetune.fc_dims == [4096, 4096]
