"""Slab stitching gives exactly MONAI's sliding_window_inference + argmax labels, in less memory."""

from __future__ import annotations

import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from hpcseg.server.inference import sliding_window_labels

CASES = [  # (spatial size, roi, overlap, mode, sw_batch_size): odd sizes, padding, several overlaps and batches
    ((33, 29, 41), (16, 16, 16), 0.25, "constant", 1),
    ((40, 36, 50), (16, 12, 20), 0.5, "gaussian", 1),
    ((20, 18, 13), (16, 16, 16), 0.7, "constant", 3),  # z smaller than the roi: padded
    ((12, 30, 70), (16, 16, 16), 0.0, "constant", 2),  # no overlap; x padded
    ((31, 31, 31), (32, 16, 24), 0.6, "gaussian", 4),
    ((17, 15, 37), (12, 12, 16), 0.8, "gaussian", 1),  # up to 5 windows deep in z
]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return UNet(3, 1, 5, (4, 8), (2,), num_res_units=0).eval()


def _monai(x, predictor, roi, sw, overlap, mode="constant"):
    with torch.no_grad():
        return sliding_window_inference(x, roi, sw, predictor, overlap=overlap, mode=mode).argmax(1)[0]


@pytest.mark.parametrize("layout", ["x", "z", "auto"])
@pytest.mark.parametrize("size,roi,overlap,mode,sw", CASES)
def test_labels_equal_monai_with_a_random_unet(net, size, roi, overlap, mode, sw, layout):
    x = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(sum(size)))
    with torch.no_grad():
        labels = sliding_window_labels(x, net, roi, sw, overlap, mode=mode, layout=layout)
    expected = _monai(x, net, roi, sw, overlap, mode)
    assert labels.shape == tuple(size) and labels.dtype == torch.uint8
    assert torch.equal(labels, expected.to(torch.uint8))


def _tie_maker():
    """Logits that differ between classes by about the rounding error of their sums: any change in the order in
    which windows are added flips thousands of labels (the control below proves it)."""
    torch.manual_seed(1)
    c1, c2 = torch.nn.Conv3d(1, 1, 3, padding=1), torch.nn.Conv3d(1, 1, 5, padding=2)

    def predict(x):
        h, g = 1e4 * c1(x), c2(x)
        return torch.cat([h, h + 1e-3 * g, h - 1e-3 * g], 1)

    return predict


def _z_outer_stitch(x, predictor, roi, overlap):
    """Plain stitching that visits windows z-group by z-group: the same sums in another order."""
    size = x.shape[2:]
    interval = [r if r == s else max(int(r * (1 - overlap)), 1) for r, s in zip(roi, size, strict=True)]
    slices = sorted(dense_patch_slices(size, roi, interval), key=lambda s: s[-1].start)
    acc, cnt = torch.zeros(3, *size), torch.zeros(1, *size)
    for s in slices:
        acc[(slice(None), *s)] += predictor(x[(slice(0, 1), slice(None), *s)])[0]
        cnt[(slice(None), *s)] += 1
    return (acc / cnt).argmax(0).to(torch.uint8)


@pytest.mark.parametrize("layout", ["x", "z"])
@pytest.mark.parametrize("size,roi,overlap", [((33, 29, 41), (16, 16, 16), 0.5), ((20, 18, 36), (12, 12, 16), 0.75)])
def test_summation_order_is_monais_even_when_it_decides_the_label(size, roi, overlap, layout):
    predict = _tie_maker()
    x = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = _monai(x, predict, roi, 1, overlap).to(torch.uint8)
        labels = sliding_window_labels(x, predict, roi, 1, overlap, layout=layout)
        control = _z_outer_stitch(x, predict, roi, overlap)
    assert (control != expected).sum() > 100  # the test can tell a wrong order apart...
    assert torch.equal(labels, expected)  # ...and the slab stitcher adds in MONAI's order


def test_x_slab_buffers_stay_small(net, monkeypatch):
    """x-slabs: alive accumulators never span more than one window in x and about one in y, plus the summed
    overlap with the next x-group: a fraction of MONAI's whole-volume buffer."""
    from hpcseg.server import inference

    heights, widths, alive = [], [], []
    real_add = inference._XSlab.add

    def add(self, *args):
        real_add(self, *args)
        heights.append(sum(t.shape[2] for t in self.acc.values()))
        widths.append(max(t.shape[1] for t in self.acc.values()))
        alive.append(sum(t.numel() for t in self.acc.values()) + sum(a.numel() for a, _ in self.carry.values()))

    monkeypatch.setattr(inference._XSlab, "add", add)
    x = torch.randn(1, 1, 96, 96, 24)
    with torch.no_grad():
        labels = sliding_window_labels(x, net, (16, 16, 16), 1, 0.25)  # auto: x-slabs for this shape
    assert alive, "x-slabs were used"
    assert torch.equal(labels, _monai(x, net, (16, 16, 16), 1, 0.25).to(torch.uint8))
    assert max(widths) == 16 and max(heights) <= 16 + 12  # one window wide, a window and a stride high
    classes = 5
    # ... plus the columns the next x-group also covers: 4, or 8 before the last window (its start is clipped to 80)
    assert max(alive) <= classes * 24 * (16 * 28 + 8 * 96)
    assert max(alive) < 0.2 * classes * 96 * 96 * 24  # MONAI's buffer: the whole volume


def test_a_long_volume_takes_z_slabs_whose_buffers_do_not_grow_with_its_length(net, monkeypatch):
    """A whole-body-like volume (long in z): x-slabs would keep all of z alive, so auto picks z-slabs, whose
    accumulators span about one window in x and one slab in z however long the volume."""
    from hpcseg.server import inference

    widths, depths = [], []
    real_add = inference._ZSlab.add

    def add(self, *args):
        real_add(self, *args)
        widths.append(sum(t.shape[1] for t in self.acc.values()))
        depths.append(max(t.shape[-1] for t in self.acc.values()))

    monkeypatch.setattr(inference._ZSlab, "add", add)
    x = torch.randn(1, 1, 40, 40, 200)
    with torch.no_grad():
        labels = sliding_window_labels(x, net, (16, 16, 16), 1, 0.25)
    assert widths, "z-slabs were used"
    assert torch.equal(labels, _monai(x, net, (16, 16, 16), 1, 0.25).to(torch.uint8))
    assert max(widths) <= 16 + 12 and max(depths) <= 16  # roi + stride columns, a slab of at most roi slices


def test_an_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout"):
        sliding_window_labels(torch.randn(1, 1, 20, 20, 20), lambda w: w.clone(), (8, 8, 8), layout="y")


def test_single_channel_output_is_thresholded_and_progress_is_reported():
    calls = []
    x = torch.linspace(-1, 1, 20 * 20 * 20).reshape(1, 1, 20, 20, 20)
    labels = sliding_window_labels(x, lambda w: w.clone(), (8, 8, 8), 2, 0.5, threshold=0.0,
                                   progress=lambda done, total: calls.append((done, total)))
    assert torch.equal(labels, (x[0, 0] > 0).to(torch.uint8))
    assert calls[-1][0] == calls[-1][1] and len(calls) > 1


def test_a_progress_callback_that_raises_aborts_at_the_next_window_boundary():
    seen = []

    class Gone(Exception):
        pass

    def cb(done: int, total: int) -> None:
        seen.append(done)
        if done >= 3:
            raise Gone("the client went away")

    x = torch.randn(1, 1, 20, 20, 20)
    windows = []
    with pytest.raises(Gone):
        sliding_window_labels(x, lambda w: windows.append(1) or w.clone(), (8, 8, 8), 1, 0.5, progress=cb)
    assert seen == [1, 2, 3] and len(windows) == 3  # no window after the one that raised


def test_segment_reports_to_the_callback_bound_to_the_request_thread():
    import SimpleITK as sitk

    from hpcseg.server import progress
    from hpcseg.server.inference import segment
    from hpcseg.server.modelbase import ModelManifest

    manifest = ModelManifest(name="t", version="1", type="segmentation", labels={"a": 1}, roi_size=[8, 8, 8])
    image = sitk.GetImageFromArray((torch.rand(20, 20, 20) * 100).numpy())
    calls = []
    with progress.reporting(lambda d, t: calls.append((d, t))):
        segment(image, lambda w: torch.cat([torch.zeros_like(w), w], 1), manifest, {})
    assert calls and calls[-1][0] == calls[-1][1] and calls[-1][1] > 1
    calls.clear()
    segment(image, lambda w: torch.cat([torch.zeros_like(w), w], 1), manifest, {})  # nothing bound: nothing called
    assert calls == []


def test_more_than_256_classes_gives_uint16_labels():
    x = torch.randn(1, 1, 10, 10, 10)
    w = torch.randn(300, 1, 1, 1, 1)

    def predict(win):
        return torch.nn.functional.conv3d(win, w)

    labels = sliding_window_labels(x, predict, (8, 8, 8), 1, 0.25)
    expected = _monai(x, predict, (8, 8, 8), 1, 0.25)
    assert labels.numpy().dtype.name == "uint16"
    assert torch.equal(labels.to(torch.int64), expected)
