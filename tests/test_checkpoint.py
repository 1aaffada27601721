import pickle

import pytest
import torch

from sppdet.checkpoint import FORMAT, VERSION, load_checkpoint, save_checkpoint
from sppdet.errors import CheckpointError


def payload():
    return {"config": {"name": "x"}, "classes": ["a", "b"], "backbone": {"name": "zf5", "weights": None,
            "weights_id": "abc"}, "svm": {"W": torch.ones(3, 2), "b": torch.zeros(2), "scale": 0.5}}


def test_round_trip(tmp_path):
    p = save_checkpoint(tmp_path / "m.pt", payload())
    d = load_checkpoint(p)
    assert d["format"] == FORMAT and d["version"] == VERSION and d["classes"] == ["a", "b"]
    assert torch.equal(d["svm"]["W"], torch.ones(3, 2))
    assert not list(tmp_path.glob(".m.pt*"))   # no temporary files left behind


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("content, needle", [
    (None, "no such checkpoint"),
    (b"not a zip", "not a readable sppdet checkpoint"),
    ("evil", "not a readable sppdet checkpoint"),
    ({"format": "other"}, "not an sppdet checkpoint"),
    ({"format": FORMAT, "version": 99}, "version 99 is not supported"),
    ({"format": FORMAT, "version": VERSION, "config": {}}, "missing 'classes'"),
])
def test_bad_checkpoints_are_one_line_errors(tmp_path, content, needle, capsys):
    p = tmp_path / "m.pt"
    if content == "evil":
        p.write_bytes(pickle.dumps({"x": Evil()}))
        torch.save({"x": Evil()}, p)
    elif isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, dict):
        torch.save(content, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)
    assert "code ran" not in capsys.readouterr().out      # weights_only: nothing executed
