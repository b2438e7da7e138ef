import pytest
import torch

from vision_eff.zoo import data


def test_same_index_same_image_across_calls_and_chunk_boundaries():
    a, la = data.batch("train", 250, 12, 32)  # crosses the chunk boundary at 256
    b, lb = data.batch("train", 250, 12, 32)
    assert torch.equal(a, b) and torch.equal(la, lb)
    c, lc = data.batch("train", 256, 6, 32)
    assert torch.equal(a[6:], c) and torch.equal(la[6:], lc)


def test_dataset_view_matches_batches():
    ds = data.ShapesDataset("eval", 32)
    x, y = data.eval_split(32, count=300)
    for i in (0, 255, 256, 299):
        img, lab = ds[i]
        assert torch.equal(img, x[i]) and lab == int(y[i])


def test_resolutions_render_the_same_scene():
    x32, y32 = data.batch("train", 0, 16, 32)
    x64, y64 = data.batch("train", 0, 16, 64)
    assert torch.equal(y32, y64)
    down = torch.nn.functional.avg_pool2d(x64, 2)
    # the same scene sampled on two supersampling grids: equal up to edge anti-aliasing
    assert (down - x32).abs().mean() < 0.02
    other = torch.nn.functional.avg_pool2d(data.batch("train", 16, 16, 64)[0], 2)
    assert (other - x32).abs().mean() > 10 * (down - x32).abs().mean()


def test_splits_differ_and_values_in_range():
    tr, _ = data.batch("train", 0, 64, 32)
    ev, _ = data.eval_split(32, count=64)
    assert not torch.equal(tr, ev)
    assert tr.min() >= -1 and tr.max() <= 1 and tr.shape == (64, 3, 32, 32)


def test_all_classes_present_and_roughly_balanced():
    _, y = data.eval_split(32)
    counts = torch.bincount(y, minlength=data.NUM_CLASSES)
    assert (counts > len(y) / data.NUM_CLASSES * 0.7).all()


def test_render_labels_gives_requested_classes_and_is_seeded():
    labels = torch.tensor([3, 3, 7])
    a = data.render_labels(labels, 32, seed=5)
    b = data.render_labels(labels, 32, seed=5)
    c = data.render_labels(labels, 32, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="test"), "unknown split"),
    (dict(size=48), "sizes"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.ShapesDataset(**kwargs)
