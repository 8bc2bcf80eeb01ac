"""Bad input to the library functions: a clear ValueError, never garbage."""

import warnings

import numpy as np
import pyro
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnn_mnist as bm
from conftest import ready_net


@pytest.fixture
def net():
    return ready_net(8, init_scale=0.05)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.rand(3, 783), r"shape \(B, 784\), \(B, 28, 28\) or \(B, 1, 28, 28\), got \(3, 783\)"),
        (torch.rand(2, 3, 28, 28), r"got \(2, 3, 28, 28\)"),
        (torch.rand(784), "one image of shape"),
        (torch.rand(0, 784), "^empty batch: no images to predict$"),
        (torch.rand(2, 784) * 255, r"pixel values must lie in \[0, 1\].*divide 0-255 images by 255"),
        (-torch.rand(2, 784), r"must lie in \[0, 1\]"),
        (torch.full((2, 784), float("nan")), "^images contain NaN pixels$"),
        (torch.full((2, 784), float("inf")), r"must lie in \[0, 1\]"),
        (torch.ones(2, 784, dtype=torch.int32), "float in \\[0, 1\\] or uint8"),
        (torch.ones(2, 784, dtype=torch.bool), "dtype torch.bool"),
        ("an image", "^images must be a tensor or array, got str: "),
    ],
)
def test_bad_images_raise_a_clear_value_error(net, x, message):
    with pytest.raises(ValueError, match=message):
        bm.predict_prob(x, net)


def test_uint8_images_are_scaled_and_numpy_accepted(net):
    x8 = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    assert torch.equal(bm.to_images(x8), x8.reshape(3, 784).float() / 255)
    assert torch.equal(bm.to_images(x8.numpy()), bm.to_images(x8))
    assert bm.to_images(np.zeros((2, 784))).dtype == torch.float32


def test_bad_num_samples(net):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_samples must be a positive integer"):
            bm.predict_prob(torch.rand(2, 784), net, bad)


def test_plot_rejects_bad_probs(net):
    with pytest.raises(ValueError, match=r"probs must have shape \(S, 10\) or \(10,\)"):
        bm.plot(torch.rand(784), torch.rand(3, 9))
    with pytest.raises(ValueError, match="NaN"):
        bm.plot(torch.full((784,), float("nan")), torch.full((10,), 0.1))


DTYPES = [torch.float32, torch.float64, torch.float16, torch.uint8, torch.int64, torch.bool]
SHAPES = st.one_of(
    st.tuples(st.integers(0, 3), st.sampled_from([784, 783, 28])),
    st.tuples(st.integers(0, 3), st.sampled_from([28, 27]), st.sampled_from([28, 1])),
    st.tuples(st.integers(0, 3), st.sampled_from([1, 3]), st.just(28), st.just(28)),
    st.tuples(st.integers(1, 800)),
)
VALUES = st.sampled_from(["unit", "pixels", "negative", "nan", "inf", "zeros"])


def valid_images(x):
    """The promise, decided independently: (B, 784), (B, 28, 28) or (B, 1, 28, 28) with B > 0,
    and either uint8 or float in [0, 1] without NaN."""
    shape_ok = x.shape[:1] != (0,) and tuple(x.shape[1:]) in ((784,), (28, 28), (1, 28, 28))
    if not shape_ok:
        return False
    if x.dtype == torch.uint8:
        return True
    values = x.double().numpy()
    return x.dtype in (torch.float16, torch.float32, torch.float64) and not np.isnan(values).any() \
        and values.min() >= 0 and values.max() <= 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=SHAPES, dtype=st.sampled_from(DTYPES), values=VALUES, seed=st.integers(0, 2**16))
def test_predict_prob_returns_probabilities_or_raises_value_error(net, shape, dtype, values, seed):
    g = torch.Generator().manual_seed(seed)
    x = {"unit": torch.rand(shape, generator=g), "pixels": torch.rand(shape, generator=g) * 255,
         "negative": -torch.rand(shape, generator=g) - 0.01, "nan": torch.full(shape, float("nan")),
         "inf": torch.full(shape, float("inf")), "zeros": torch.zeros(shape)}[values]
    x = x.to(dtype)
    if not valid_images(x):
        with pytest.raises(ValueError):
            bm.to_images(x)
        with pytest.raises(ValueError):
            bm.predict_prob(x, net, 3)
        return
    converted = bm.to_images(x)
    flat = x.reshape(shape[0], 784)
    expected = flat.float() / 255 if dtype == torch.uint8 else flat.float()
    assert converted.dtype == torch.float32 and torch.equal(converted, expected)
    assert torch.equal(bm.to_images(x.numpy()), expected)  # NumPy arrays alike
    probs = bm.predict_prob(x, net, 3)
    assert probs.shape == (shape[0], 10)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(shape[0]), atol=1e-5)


def test_plot_takes_one_image(net):
    with pytest.raises(ValueError, match=r"one 28x28 image, got shape \(2, 784\)"):
        bm.plot(torch.rand(2, 784), torch.full((10,), 0.1))


def test_plot_draws_a_skewed_spread_around_a_mean_outside_it(tmp_path):
    """96 samples sure of class 3 and 4 sure of class 7: class 7's mean (0.04) lies above its
    95% quantile (0), and class 3's (0.96) below its 5% quantile (1), which an error bar centred
    on the mean cannot draw. The whisker is the
    spread itself, from the 5% to the 95% quantile of each class."""
    probs = torch.zeros(100, 10)
    probs[:96, 3], probs[96:, 7] = 1.0, 1.0
    fig = bm.plot(torch.rand(784), probs, label=3, path=tmp_path / "p.png")
    whiskers = [c for c in fig.axes[1].collections if c.get_label() == "5-95% of samples"][0]
    spans = [(seg[0][1], seg[1][1]) for seg in whiskers.get_segments()]
    assert spans[3] == pytest.approx((1.0, 1.0)) and spans[7] == pytest.approx((0.0, 0.0))
    assert (tmp_path / "p.png").stat().st_size > 0


# -----------------------------------------------------------------------------
# Arrays a notebook user makes are not always contiguous: flipped, transposed back, Fortran-ordered.


def test_views_that_are_not_contiguous_give_the_same_answer_as_a_copy(net):
    x = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    flipped = x[:, :, ::-1]  # np.fliplr on each image: negative strides
    variants = {
        "flipped numpy view": (flipped, np.ascontiguousarray(flipped)),
        "Fortran-ordered numpy": (np.asfortranarray(x.reshape(4, 784)), x.reshape(4, 784)),
        "transposed-back torch view": (torch.from_numpy(np.ascontiguousarray(x.reshape(4, 784).T)).T,
                                       torch.from_numpy(x.reshape(4, 784))),
        "every other image": (np.repeat(x, 2, axis=0)[::2], x),
    }
    for name, (view, copy) in variants.items():
        torch.manual_seed(0)
        got = bm.predict_prob(view, net, 3)
        torch.manual_seed(0)
        # the same answer, up to float rounding (a matrix product may add in another order)
        assert torch.allclose(got, bm.predict_prob(copy, net, 3), rtol=0, atol=1e-6), name
        assert torch.allclose(net(view), net(copy), rtol=0, atol=1e-5), name
    assert flipped.strides[2] < 0  # the first one really is a negative-stride view


def test_plot_draws_the_mean_as_bars_and_the_digit_scaled_to_its_own_range():
    """What the article's figure shows: one bar per class at the mean over the samples (the
    forced class in red), the digit min-max scaled (a faint digit is shown as dark as a bold one)."""
    probs = torch.softmax(torch.randn(7, 10, generator=torch.Generator().manual_seed(0)) * 3, -1)
    image = torch.linspace(0.1, 0.3, 784)  # faint: its ink spans 0.1-0.3
    fig = bm.plot(image, probs, label=2)
    assert len(fig.axes) == 2  # the digit and the chart, no empty panel
    bars = fig.axes[1].patches
    assert [b.get_height() for b in bars] == pytest.approx(probs.mean(0).tolist(), abs=1e-6)
    red = [i for i, b in enumerate(bars) if b.get_facecolor()[0] > 0.7 and b.get_facecolor()[2] < 0.5]
    assert red == [int(probs.mean(0).argmax())]
    digit = fig.axes[0].images[0]
    assert digit.get_cmap().name == "gray_r" and digit.get_clim() == (0, 1)  # dark ink on white, 0 to 1
    shown = torch.as_tensor(digit.get_array().data)
    assert shown.min() == 0 and shown.max() == pytest.approx(1) and torch.allclose(shown.flatten(), bm.normalize(image))
    assert fig.axes[0].get_title() == f"truth 2, predicted {int(probs.mean(0).argmax())}"
    assert torch.equal(bm.normalize(torch.full((784,), 0.4)), torch.zeros(784))  # a blank image stays blank


def test_pixel_values_on_the_edges_of_the_documented_range():
    """Floats in [0, 1], closed at both ends; uint8 0 and 255 are 0 and 1."""
    edges = torch.tensor([[0.0] * 392 + [1.0] * 392])
    assert torch.equal(bm.Plumbing.to_images(edges), edges)
    assert torch.equal(bm.Plumbing.to_images(torch.tensor([[0] * 392 + [255] * 392], dtype=torch.uint8)), edges)
    for just_outside in (torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)), torch.tensor(-1e-7)):
        with pytest.raises(ValueError, match=r"pixel values must lie in \[0, 1\]"):
            bm.Plumbing.to_images(torch.full((1, 784), float(just_outside)))


def test_plot_takes_probabilities_as_a_plain_list_of_ints():
    """A one-hot answer typed by hand, [0, 0, 1, 0, ...], is a (10,) of probabilities too."""
    fig = bm.plot(torch.rand(784), [0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    assert [b.get_height() for b in fig.axes[1].patches] == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("num_samples", [1, 2, 3])
def test_plot_shows_the_samples_spread_whenever_there_are_two_or_more(num_samples):
    """One dot per sample per class and a 5-95% whisker when there is a spread to show (two samples
    or more); a single sample, or one row of probabilities, is the bars alone."""
    probs = torch.softmax(torch.randn(num_samples, 10, generator=torch.Generator().manual_seed(1)), -1)
    collections = bm.plot(torch.rand(784), probs).axes[1].collections
    if num_samples == 1:
        assert len(collections) == 0
    else:
        dots = [c for c in collections if c.get_label() == f"{num_samples} posterior samples"][0]
        assert len(dots.get_offsets()) == num_samples * 10 and len(collections) == 2


def test_the_dots_sit_beside_their_class_and_the_scale_is_probability():
    """Each sample's dot is jittered sideways within 0.2 of its class (centred on it, so classes never
    mix); the y axis is probability, 0 to 1, whatever the bars' heights."""
    probs = torch.full((400, 10), 0.01)
    probs[:, 4] = 0.91
    ax = bm.plot(torch.rand(784), probs, generator=torch.Generator().manual_seed(2)).axes[1]
    dots = [c for c in ax.collections if c.get_label() == "400 posterior samples"][0].get_offsets()
    offset = torch.as_tensor(dots[:, 0]).reshape(400, 10) - torch.arange(10)  # (S, 10): x minus its class
    assert offset.abs().max() <= 0.2 and offset.abs().max() > 0.19  # the whole band, never beyond
    assert abs(float(offset.mean())) < 0.01  # centred on the class
    assert ax.get_ylim() == pytest.approx((0, 1.02)) and list(ax.get_xticks()) == list(range(10))  # every class


def png_size(data):
    """(width, height) in pixels of PNG bytes."""
    import struct

    assert data.startswith(b"\x89PNG")
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("name, magic", [("p.png", b"\x89PNG"), ("p.pdf", b"%PDF"), ("p.svg", b"<?xml"), ("p", b"\x89PNG")])
def test_a_figure_is_saved_in_the_format_its_name_asks_for(tmp_path, name, magic):
    """The suffix picks the format (none: PNG); PNGs at 110 dpi (the article's figure: 8 x 3.2 inches)."""
    bm.plot(torch.rand(784), torch.full((10,), 0.1), path=tmp_path / name)
    data = (tmp_path / name).read_bytes()
    assert data.startswith(magic)
    if magic == b"\x89PNG":
        assert png_size(data) == (880, 352)


def test_in_a_notebook_a_figure_is_shown_once_as_a_png_and_elsewhere_not_at_all(monkeypatch, capsys):
    import IPython
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    bm.plot(torch.rand(784), torch.full((10,), 0.1))  # a script: no IPython shell
    assert shown == [] and capsys.readouterr().out == ""
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())  # a notebook
    bm.plot(torch.rand(784), torch.full((10,), 0.1))
    (image,) = shown
    assert image.format == "png" and png_size(image.data) == (880, 352)


def test_each_figure_has_the_panels_it_draws_and_no_empty_one():
    probs = torch.softmax(torch.randn(6, 20, 10, generator=torch.Generator().manual_seed(0)), -1)  # (S, N, 10)
    y, score = torch.randint(0, 10, (20,)), torch.rand(20)
    figures = {
        "reliability": (bm.plot_reliability(probs.mean(0), y), 2),
        "coverage": (bm.plot_coverage(score, torch.rand(20) > 0.3, score > 0.8, "max_prob"), 1),
        "histograms": (bm.plot_histograms({"MNIST": score, "noise": score + 1}, "max_prob", 0.8), 1),
    }
    for name, (fig, panels) in figures.items():
        assert len(fig.axes) == panels, name
        for ax in fig.axes:
            assert ax.lines or ax.patches or ax.collections or ax.images, name  # each panel draws something


def test_the_coverage_curve_is_drawn_against_coverage():
    score, correct = torch.tensor([0.4, 0.1, 0.3, 0.2]), torch.tensor([True, True, False, True])
    line = bm.plot_coverage(score, correct, score > 0.35, "max_prob").axes[0].lines[0]
    cov, acc = bm.accuracy_coverage_curve(score, correct)
    assert list(line.get_xdata()) == cov.tolist() == [0.25, 0.5, 0.75, 1.0] and list(line.get_ydata()) == acc.tolist()
    point = bm.plot_coverage(score, correct, score > 0.35, "max_prob").axes[0].collections[0].get_offsets()
    assert point.tolist() == [[0.75, pytest.approx(2 / 3)]]  # the rule's point: image 0 refused, 2 of the 3 kept right


def test_the_examples_figure_says_each_verdict_above_its_digit_and_blanks_the_empty_cells():
    probs = torch.full((4, 3, 10), 0.01)  # (S, N, 10): the samples agree on 7, 2 and 4
    probs[:, 0, 7], probs[:, 1, 2], probs[:, 2, 4] = 0.91, 0.91, 0.91  # the first is a 0 read as a 7
    fig = bm.plot_examples(torch.rand(3, 784), probs, torch.rand(3), torch.tensor([False, True, False]),
                           labels=torch.tensor([0, 3, -1]), ncols=2)
    axes = np.array(fig.axes).reshape(4, 2)  # rows: digits, their spreads, digits, their spreads
    digits = [axes[0, 0], axes[0, 1], axes[2, 0]]
    assert [ax.get_title() for ax in digits] == ["says 7 (true 0)", "refused (true 3)", "says 4"]
    assert all(ax.images for ax in digits)
    assert not axes[2, 1].axison and not axes[3, 1].axison  # the fourth cell holds nothing: no frame, no ticks
    from matplotlib.colors import to_rgba

    frames = [ax.spines["left"].get_edgecolor() for ax in digits]
    assert frames == [to_rgba("#55a868"), to_rgba("#c44e52"), to_rgba("#55a868")]  # green accepted, red refused
    assert all(ax.spines[side].get_visible() is True for ax in digits for side in ax.spines)  # drawn, all four sides
    assert axes[3, 0].axison and axes[3, 0].lines  # the third digit's spread is drawn
    assert list(axes[1, 0].get_xticks()) == list(range(10))  # every class named under its spread
    boxes = [line.get_xdata() for line in axes[1, 0].lines if len(line.get_xdata()) == 5]  # each box's outline
    assert [float(np.mean(b[:2])) for b in boxes] == pytest.approx(list(range(10)))  # class c's box above tick c
    low, high = axes[1, 0].get_ylim()
    assert -0.05 < low < 0 and 1 < high < 1.05  # probabilities of 0 and 1 drawn inside the panel, not on its edge
    fig = bm.plot_examples(torch.rand(1, 784), probs[:, :1], torch.rand(1), torch.tensor([False]), ncols=3)
    assert [ax.axison for ax in fig.axes[1:3] + fig.axes[4:]] == [False] * 4  # every empty cell blank, not the first


def test_the_reliability_bars_stand_on_their_bins_and_the_title_gives_the_figures_ece():
    probs = torch.softmax(3 * torch.randn(200, 10, generator=torch.Generator().manual_seed(1)), -1)
    y = probs.argmax(1).clone()
    y[::3] = (y[::3] + 1) % 10  # right on two images in three: some bins over-, some under-confident
    fig = bm.plot_reliability(probs, y, bins=10)
    count, _, acc = bm.calibration_bins(probs, y, 10)
    bars = fig.axes[0].patches
    used = (count > 0).nonzero().flatten().tolist()
    assert [round(b.get_x() + b.get_width() / 2, 6) for b in bars] == [round((i + 0.5) / 10, 6) for i in used]
    assert [b.get_height() for b in bars] == pytest.approx(acc[used].tolist())
    assert [b.get_width() for b in bars] == pytest.approx([0.09] * len(used))  # each within its bin, a gap between
    assert [b.get_width() for b in fig.axes[1].patches] == pytest.approx([0.09] * 10)  # the counts' bars too
    ece = bm.expected_calibration_error(probs, y, 10)
    assert f"(ECE {ece:.4f})" in fig.axes[0].get_title() and abs(ece - bm.expected_calibration_error(probs, y)) > 1e-3
    _, conf, _ = bm.calibration_bins(probs, y, 10)
    dots = next(line for line in fig.axes[0].lines if line.get_label() == "mean confidence in bin")
    assert dots.get_xdata().tolist() == pytest.approx([(i + 0.5) / 10 for i in used])  # on their bins
    assert dots.get_ydata().tolist() == pytest.approx(conf[used].tolist())
    diagonal = next(line for line in fig.axes[0].lines if line.get_label() == "perfect calibration")
    assert list(diagonal.get_xdata()) == [0, 1] and list(diagonal.get_ydata()) == [0, 1]  # what the bars are held to
    assert fig.axes[1].get_yscale() == "log"  # the counts' axis, as its label says
    by_default = bm.plot_reliability(probs, y)  # the bins the run's ECE is measured in (metrics.json's)
    assert len(by_default.axes[1].patches) == 15 and f"(ECE {bm.expected_calibration_error(probs, y):.4f})" in \
        by_default.axes[0].get_title()
    two = torch.tensor([[0.95] + [0.05 / 9] * 9, [0.55] + [0.45 / 9] * 9])  # one image in each of two bins
    assert len(bm.plot_reliability(two, torch.tensor([0, 1]), bins=10).axes[0].patches) == 2  # a bin of one: a bar


def test_each_sets_histogram_sums_to_one_with_scores_of_zero_in_its_first_bin():
    """Sets of different sizes on one scale (fractions), and scores of exactly 0 (samples that agree) counted."""
    scores = {"MNIST": torch.zeros(8), "noise": torch.zeros(3)}
    ax = bm.plot_histograms(scores, "mutual_information", 0.05).axes[0]
    assert [p.get_xy()[:, 1].max() for p in ax.patches] == pytest.approx([1.0, 1.0])  # all of each in one bin
    for threshold in (1.5, 0.05):
        drawn = bm.plot_histograms({"MNIST": torch.zeros(8)}, "mutual_information", threshold).axes[0].patches[0]
        xy = drawn.get_xy()
        assert xy[xy[:, 1] > 0, 0].max() <= threshold  # below the threshold, so drawn left of its line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of an axis it cannot draw on a log scale
        ax = bm.plot_histograms({"MNIST": torch.zeros(8)}, "mutual_information", None).axes[0]
    low, high = ax.get_xlim()
    assert [p.get_xy()[:, 1].max() for p in ax.patches] == [1.0] and 0 < low < high  # no threshold: still drawn
    smallest = {"MNIST": torch.tensor([0.0, 0.2, 0.2], dtype=torch.float64)}  # the axis starts at 0.2, whose log
    ax = bm.plot_histograms(smallest, "mutual_information", None).axes[0]  # rounds back to 0.2000000000000001
    assert [p.get_xy()[:, 1].max() for p in ax.patches] == pytest.approx([1.0])  # still in the first bin, counted


def test_the_histograms_draw_the_threshold_on_a_log_axis_that_holds_every_score():
    scores = {"MNIST": torch.tensor([0.0, 0.001, 0.01, 0.02]), "noise": torch.tensor([0.3, 0.8])}
    ax = bm.plot_histograms(scores, "mutual_information", 0.05).axes[0]
    assert ax.get_xscale() == "log"
    assert ax.patches[0].get_xy()[1, 1] == pytest.approx(0.5)  # MNIST's first bin: its 0 and its smallest, 0.001
    assert [line.get_xdata()[0] for line in ax.lines] == [0.05]  # the threshold, where refusing starts
    edges = [p.get_xy()[:, 0] for p in ax.patches]
    # the axis starts at the smallest score above 0 (where a 0 is drawn), not decades below it (0.001 < 0.05 / 10)
    assert min(e.min() for e in edges) == pytest.approx(0.001) and 0.8 <= max(e.max() for e in edges) <= 0.8 * 1.1
    entropies = {"MNIST": torch.tensor([0.0, 1.5, 2.0])}  # scores above 1 (entropy reaches ln 10): the same rule
    drawn = bm.plot_histograms(entropies, "expected_entropy", None).axes[0].patches[0].get_xy()[:, 0]
    assert drawn.min() == pytest.approx(1.5) and drawn.max() >= 2.0
    assert not bm.plot_histograms(scores, "mutual_information", None).axes[0].lines  # no threshold, no line
    steps = np.unique(np.round(np.log(np.concatenate(edges)), 9))
    assert len(steps) > 30 and np.allclose(np.diff(steps), np.diff(steps)[0])  # many bins, even on the log axis


def test_the_pixel_scale_figure_shows_the_stds_on_a_log_scale():
    from matplotlib.colors import LogNorm

    net = ready_net(8)
    fig = bm.plot_pixel_scales(net, torch.rand(784))
    assert isinstance(fig.axes[0].images[0].norm, LogNorm)
    assert len(fig.axes) == 4 and len([ax for ax in fig.axes if ax.images]) == 2  # two panels, each with its bar


def test_one_image_where_a_batch_is_taken_says_how_to_make_it_one(net):
    image = torch.rand(28, 28)
    for x, shape in ((image, "(28, 28)"), (image.flatten(), "(784,)")):
        with pytest.raises(ValueError) as e:
            bm.predict_prob(x, net, 2)
        assert str(e.value) == f"got one image of shape {shape}: pass a batch, e.g. x[None]"
    assert bm.predict_prob(image[None], net, 2).shape == (1, 10)
