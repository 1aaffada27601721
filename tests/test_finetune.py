import numpy as np
import pytest
import torch

from sppdet.data.records import ImageRecord
from sppdet.models.heads import FCHead, fc7_features
from sppdet.train.finetune import FinetuneParams, TrainingError, finetune
from sppdet.train.windows import build_windows

K, D = 3, 24


def make_problem(n_images=6, seed=0):
    """Windows of tiny images; the feature of a window encodes its best class when it is foreground."""
    rng = np.random.default_rng(seed)
    windows, table = [], {}
    for i in range(n_images):
        gt = np.array([[10, 10, 60, 60], [100, 40, 170, 120]], np.float32)
        labels = rng.integers(0, K, 2)
        rec = ImageRecord(f"im{i}", f"im{i}.jpg", 200, 160, gt, labels)
        base = gt[rng.integers(0, 2, 120)]
        props = base + rng.normal(0, 12, base.shape).astype(np.float32)
        props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 2)
        w = build_windows(i, rec, props, K)
        windows.append(w)
        centers = np.eye(K + 1, D) * 4
        cls = np.where(w.max_iou >= 0.5, w.best_label + 1, 0)
        feats = centers[cls] + rng.normal(0, 1, (len(w), D))
        table[(i, False)] = torch.tensor(feats, dtype=torch.float32)
        table[(i, True)] = torch.tensor(feats + rng.normal(0, 0.1, feats.shape), dtype=torch.float32)
    return windows, table


def feature_fn_for(table):
    return lambda i, idx, flip: table[(i, flip)][torch.as_tensor(idx)]


def params(iters, **kw):
    return FinetuneParams(iterations=iters, batch_size=32, images_per_batch=2, lr=0.05, seed=3,
                          snapshot_seconds=1e9, **kw)


def test_finetune_learns_separable_problem():
    windows, table = make_problem()
    head = FCHead(D, [32, 32], K, dropout=0.0)
    torch.manual_seed(0)
    head.reset_parameters()
    stats = finetune(head, feature_fn_for(table), windows, params(300), show_progress=False)
    assert stats["iterations"] == 300 and stats["accuracy"] > 0.95
    # evaluate on every window: the classifier recovers the labels
    x = torch.cat([table[(w.index, False)] for w in windows])
    y = torch.cat([torch.as_tensor(np.where(w.max_iou >= 0.5, w.best_label + 1, 0)) for w in windows])
    with torch.no_grad():
        acc = (head(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95
    assert fc7_features(head, x).shape == (len(x), 32)


def test_interrupted_finetune_resumes_to_identical_weights(tmp_path):
    windows, table = make_problem(seed=1)
    fn = feature_fn_for(table)

    def fresh():
        torch.manual_seed(0)
        h = FCHead(D, [16], K, dropout=0.5)   # dropout: the torch RNG state must be restored too
        h.reset_parameters()
        return h

    ref = fresh()
    finetune(ref, fn, windows, params(60), show_progress=False)

    calls = {"n": 0}

    def interrupting(i, idx, flip):
        calls["n"] += 1
        if calls["n"] == 2 * 25 + 1:         # during iteration 26 (2 images per iteration)
            raise KeyboardInterrupt
        return fn(i, idx, flip)

    snap = tmp_path / "snap.pt"
    h = fresh()
    with pytest.raises(KeyboardInterrupt):
        finetune(h, interrupting, windows, params(60), snapshot=snap, key="k1", show_progress=False)
    assert snap.is_file()
    assert torch.load(snap, weights_only=True)["iteration"] == 25
    resumed = fresh()
    stats = finetune(resumed, fn, windows, params(60), snapshot=snap, key="k1", show_progress=False)
    assert stats["resumed_from"] == 25
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # a snapshot made with other settings is ignored
    other = fresh()
    assert finetune(other, fn, windows, params(60), snapshot=snap, key="other",
                    show_progress=False)["resumed_from"] == 0


def test_non_finite_loss_stops_with_values():
    windows, table = make_problem()
    bad = {k: v * float("inf") for k, v in table.items()}
    head = FCHead(D, [8], K, dropout=0.0)
    with pytest.raises(TrainingError, match=r"diverged at iteration 1: loss values (nan|inf)"):
        finetune(head, feature_fn_for(bad), windows, params(5), show_progress=False)


def test_no_usable_images():
    rec = ImageRecord("a", "a.jpg", 50, 50, np.array([[0, 0, 50, 50]], np.float32), np.array([0]))
    w = build_windows(0, rec, np.array([[0, 0, 50, 50]], np.float32), K)   # only foreground windows
    with pytest.raises(TrainingError, match="no training image has background"):
        finetune(FCHead(D, [8], K), lambda *a: None, [w], params(5), show_progress=False)


def test_curve_block_means_against_a_reference():
    from sppdet.train.finetune import CURVE_POINTS, _Curve

    n = 2 * CURVE_POINTS + 1                      # blocks of 3 iterations, the last one of 2
    rng = np.random.default_rng(0)
    loss, acc = rng.random(n), rng.random(n)
    c = _Curve(n)
    assert c.every == 3
    for i in range(n):
        c.add(i + 1, float(loss[i]), float(acc[i]), 0.1 if i < 250 else 0.01, last=i == n - 1)
    d = c.to_dict()
    starts = list(range(0, n, 3))
    assert d["iteration"] == [min(s + 3, n) for s in starts]
    np.testing.assert_allclose(d["loss"], [loss[s:s + 3].mean() for s in starts], rtol=1e-12)
    np.testing.assert_allclose(d["accuracy"], [acc[s:s + 3].mean() for s in starts], rtol=1e-12)
    assert d["lr"] == [0.1 if min(s + 3, n) - 1 < 250 else 0.01 for s in starts]   # lr of a block's last


def test_finetune_returns_its_curve_and_keeps_it_across_a_resume(tmp_path):
    windows, table = make_problem(seed=2)
    fn = feature_fn_for(table)

    def fresh():
        torch.manual_seed(0)
        h = FCHead(D, [16], K, dropout=0.0)
        h.reset_parameters()
        return h

    ref = finetune(fresh(), fn, windows, params(60), show_progress=False)
    curve = ref["curve"]
    assert curve["every"] == 1 and curve["iteration"] == list(range(1, 61))
    # 60 iterations (< 100): the final running-mean loss/accuracy are the means of the whole curve
    assert ref["loss"] == pytest.approx(np.mean(curve["loss"]), rel=1e-12)
    assert ref["accuracy"] == pytest.approx(np.mean(curve["accuracy"]), rel=1e-12)
    # lr steps 10x at 60% of the schedule: iterations 1..36 at 0.05, then 0.005
    assert curve["lr"] == pytest.approx([0.05] * 36 + [0.005] * 24)
    assert curve["loss"][-1] < curve["loss"][0]

    calls = {"n": 0}

    def interrupting(i, idx, flip):
        calls["n"] += 1
        if calls["n"] == 2 * 40 + 1:
            raise KeyboardInterrupt
        return fn(i, idx, flip)

    snap = tmp_path / "snap.pt"
    with pytest.raises(KeyboardInterrupt):
        finetune(fresh(), interrupting, windows, params(60), snapshot=snap, key="k", show_progress=False)
    resumed = finetune(fresh(), fn, windows, params(60), snapshot=snap, key="k", show_progress=False)
    assert resumed["resumed_from"] == 40
    assert resumed["curve"]["iteration"] == curve["iteration"]
    np.testing.assert_allclose(resumed["curve"]["loss"], curve["loss"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# The mini-batch draw (one process and W ranks) and the fc8 init


def reference_one_process_batch(usable, params, rng):
    """The one-process recipe as it was written before ranks existed: ``images_per_batch``
    images out of all, then each image's windows and its coin for mirroring."""
    from sppdet.train.finetune import sample_windows

    per_image = max(1, params.batch_size // params.images_per_batch)
    out = []
    for j in rng.choice(len(usable), min(params.images_per_batch, len(usable)), replace=False):
        w = usable[j]
        idx, lab = sample_windows(w, per_image, params.fg_fraction, params.fg_iou, params.bg_iou_low,
                                  params.bg_iou_high, rng)
        if len(idx) == 0:
            continue
        out.append((w.index, idx, lab, bool(params.flip and rng.random() < 0.5)))
    return out


def test_draw_batch_with_one_share_is_the_one_process_recipe():
    from sppdet.train.finetune import draw_batch

    windows, _ = make_problem(n_images=7, seed=4)
    p = params(1, flip=True)
    for ipb in (1, 2, 3):
        p.images_per_batch = ipb
        a, b = np.random.default_rng(11), np.random.default_rng(11)
        for it in range(6):
            got, want = draw_batch([windows], it, p, a), reference_one_process_batch(windows, p, b)
            assert [g[0] for g in got] == [w[0] for w in want]
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g[1], w[1])
                np.testing.assert_array_equal(g[2], w[2])
                assert g[3] == w[3]
        assert a.bit_generator.state == b.bit_generator.state     # the same draws, nothing more


@pytest.mark.parametrize("world, ipb", [(2, 2), (2, 4), (2, 3), (3, 2), (4, 1)])
def test_draw_batch_over_ranks_gives_each_rank_its_share_of_the_global_batch(world, ipb):
    from sppdet.train.finetune import draw_batch

    windows, _ = make_problem(n_images=9, seed=5)
    shares = [[w for w in windows if w.index % world == r] for r in range(world)]
    p = params(1)
    p.images_per_batch, p.batch_size = ipb, 12 * ipb
    rng = np.random.default_rng(0)
    taken = np.zeros(world, int)
    for it in range(4 * world):
        batch = draw_batch(shares, it, p, rng)
        assert len(batch) == ipb                                          # the one-process batch size
        assert sum(len(e[1]) for e in batch) == 12 * ipb
        images = [e[0] for e in batch]
        assert len(set(images)) == len(images)                            # without replacement
        # slot j of iteration it belongs to rank (it * ipb + j) mod W: the reference, by counting
        want = np.bincount([(it * ipb + j) % world for j in range(ipb)], minlength=world)
        got = np.bincount([i % world for i in images], minlength=world)
        np.testing.assert_array_equal(got, want)
        assert images == sorted(images, key=lambda i: i % world)          # in rank order
        taken += got
    assert (taken == taken[0]).all()                                      # over W iterations: even


def test_fc8_init_std():
    from sppdet.train.finetune import init_fc_head

    torch.manual_seed(0)
    a = FCHead(64, [256], 20)
    torch.manual_seed(1)
    init_fc_head(a, "he", None, 0.01)                 # the head's own init: no extra draw
    b = FCHead(64, [256], 20)
    torch.manual_seed(1)
    b.reset_parameters()
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    torch.manual_seed(2)
    init_fc_head(a, "he", None, 0.05)
    w = a.cls_score.weight.detach()
    assert w.shape == (21, 256) and abs(float(w.std()) / 0.05 - 1) < 0.05 and abs(float(w.mean())) < 0.005
    assert torch.count_nonzero(a.cls_score.bias) == 0
