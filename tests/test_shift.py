"""Near-OOD sets, rotation shift, selective prediction and the pixel-rarity control: each
with an answer known beforehand (a pixel's new place, a curve summed by hand)."""

import math

import pyro
import pytest
import torch

import bnn_mnist as bm
from conftest import ready_net


def one_pixel(row, col):
    x = torch.zeros(1, 784)
    x[0, row * 28 + col] = 1.0
    return x


def where(x):
    return divmod(int(x[0].argmax()), 28)


def test_rotate_turns_counter_clockwise_and_mirror_flips_left_right():
    top = one_pixel(2, 14)  # above the centre
    assert where(bm.rotate(top, 90)) == (13, 2)  # a quarter turn counter-clockwise: to the left
    assert where(bm.rotate(top, 180)) == (25, 13) and where(bm.rotate(top, -90)) == (14, 25)
    assert where(bm.mirror(one_pixel(5, 3))) == (5, 24)
    # interpolated angles agree with the exact quarter turn at its limit, and 0 changes nothing
    x = torch.rand(3, 784)
    assert torch.allclose(bm.rotate(x, 90 - 1e-4), bm.rotate(x, 90), atol=1e-3)
    assert torch.equal(bm.rotate(x, 0), x) and torch.equal(bm.mirror(bm.mirror(x)), x)
    for degrees in (90, 180, -90, 270):  # quarter turns move pixels exactly, as the docstring says: no interpolation
        turned = torch.rot90(x.reshape(3, 28, 28), degrees // 90, dims=(1, 2)).reshape(3, 784)
        assert torch.equal(bm.rotate(x, degrees), turned), degrees
    double = bm.rotate(x.double(), 45)  # a notebook's float64 batch: turned in float64, as float32 turns it
    assert double.dtype == torch.float64 and torch.allclose(double, bm.rotate(x, 45).double(), atol=1e-5)
    # 45 degrees twice is 90 degrees, up to the blur of interpolating twice (a centred blob)
    blob = torch.zeros(28, 28)
    blob[8:20, 11:16] = 1.0
    twice = bm.rotate(bm.rotate(blob.reshape(1, 784), 45), 45)
    assert torch.corrcoef(torch.stack([twice[0], bm.rotate(blob.reshape(1, 784), 90)[0]]))[0, 1] > 0.9


def test_overlay_is_the_pixel_max_of_two_digits_of_different_classes():
    # digit of class k lights pixel k only: an overlay lights exactly two different pixels
    y = torch.arange(200) % 10
    x = torch.zeros(200, 784)
    x[torch.arange(200), y] = 1.0
    both = bm.overlay(x, y, 50, seed=3)
    assert both.shape == (50, 784) and torch.equal((both > 0).sum(1), torch.full((50,), 2))
    assert torch.equal(both, bm.overlay(x, y, 50, seed=3))  # a fixed draw


def test_shifted_sets_share_one_draw_of_the_digits():
    x, y = torch.rand(40, 784), torch.arange(40) % 10
    pick, shift, near = bm.shifted_sets(x, y, 25)
    assert len(pick) == len(set(pick.tolist())) == 25 and list(shift) == list(bm.SHIFT_ANGLES)
    assert torch.equal(shift[0], x[pick]) and torch.equal(shift[45], bm.rotate(x[pick], 45))
    assert near["rotated 90"] is shift[90] and near["rotated 180"] is shift[180]
    assert torch.equal(near["mirrored"], bm.mirror(x[pick])) and list(near) == list(bm.NEAR_OOD)
    assert len(bm.shifted_sets(x, y, 100)[0]) == 40  # never more than there are
    many = torch.rand(bm.DEFAULTS.shift_size + 10, 784)
    assert len(bm.shifted_sets(many, torch.arange(len(many)) % 10)[0]) == bm.DEFAULTS.shift_size  # the run's size
    again, other = bm.shifted_sets(x, y, 25, seed=0)[2], bm.shifted_sets(x, y, 25, seed=1)[2]
    assert torch.equal(again["overlaid"], near["overlaid"])  # the seed fixes every set,
    assert not torch.equal(other["overlaid"], near["overlaid"])  # the overlaid pairs too


def test_pixel_rarity_control_by_hand():
    train = torch.zeros(4, 784)
    train[:2, 0] = 0.5  # pixel 0 inked by half the digits; pixel 1 by none
    freq = bm.pixel_rarity(train)
    assert freq[0] == 0.5 and freq[1:].sum() == 0
    x = torch.zeros(2, 784)
    x[0, 0], x[1, 1] = 1.0, 0.2
    assert torch.allclose(bm.rarity_score(x, freq), torch.tensor([1 / 0.5001, 0.2 / 1e-4]))


def test_risk_coverage_by_hand():
    score = torch.tensor([0.4, 0.1, 0.3, 0.2])  # most certain first: images 1, 3, 2, 0
    correct = torch.tensor([True, True, False, True])
    # errors among the k most certain: 0/1, 0/2, 1/3 (image 2), 1/4
    r = bm.risk_coverage(score, correct, keep=0.5)
    assert r["aurc"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 4) / 4) and r["accuracy_kept"] == 1.0
    assert bm.risk_coverage(score, correct, keep=0.75)["accuracy_kept"] == pytest.approx(2 / 3)
    second_wrong = torch.tensor([True, True, True, False])  # image 3, the second most certain, is wrong
    assert [bm.risk_coverage(score, second_wrong, keep=k)["accuracy_kept"] for k in (0.1, 0.25, 0.5)] == [1, 1, 0.5]
    # ranking the error first is worse; ranking it last is the best any score can do
    assert bm.risk_coverage(torch.tensor([1.0, 2, 0, 3]), correct)["aurc"] > r["aurc"]
    assert bm.risk_coverage(torch.tensor([0.0, 1, 9, 2]), correct)["aurc"] == pytest.approx(1 / 4 / 4)


def test_shift_report_by_hand():
    # two samples, two images: image 0 the samples agree (right), image 1 they disagree (wrong)
    p = torch.tensor([[[0.9, 0.1], [0.8, 0.2]],
                      [[0.9, 0.1], [0.2, 0.8]]]).repeat(1, 1, 5) / 5  # (2, 2, 10), rows sum to 1
    y = torch.tensor([0, 2])
    r = bm.shift_report({15: p}, y)[15]
    mean = p.mean(0)
    assert r["accuracy"] == 0.5 and r["nll"] == pytest.approx(-(math.log(mean[0, 0]) + math.log(mean[1, 2])) / 2)
    h = lambda q: -(q * q.log()).sum(-1)  # noqa: E731
    mi = (h(mean) - h(p).mean(0)).mean()
    assert r["mutual_information"] == pytest.approx(float(mi)) and r["mutual_information"] > 0.05


def test_sets_scored_in_one_pass_equal_one_call_on_their_concatenation():
    net = ready_net(init_scale=0.2)
    a, b = torch.rand(7, 784), torch.rand(3, 784)
    pyro.set_rng_seed(4)
    both = bm.sample_probs_sets({"a": a, "b": b}, net, 5)
    pyro.set_rng_seed(4)
    whole = bm.sample_probs_local(torch.cat([a, b]), net, 5)
    assert both["a"].shape == (5, 7, 10) and torch.equal(torch.cat([both["a"], both["b"]], 1), whole)


def test_a_guide_of_the_retired_fanin_prior_is_refused_in_one_line(tmp_path):
    net = bm.BNN(784, 16, 10)
    net.trained.fill_(True)
    bm.save_guide(tmp_path / "g.pt", net)
    obj = torch.load(tmp_path / "g.pt", weights_only=True)
    obj["settings"]["prior"] = "fanin"  # what an older version saved
    torch.save(obj, tmp_path / "old.pt")
    with pytest.raises(bm.Error, match="old.pt was trained with the 'fanin' prior, which this version does not have"):
        bm.load_guide(tmp_path / "old.pt")
    assert bm.load_guide(tmp_path / "g.pt").prior_scale == 1.0


def test_shift_and_pixel_scale_figures(tmp_path):
    results = {"a": {a: {"accuracy": 1 - a / 200, "ece": a / 400} for a in bm.SHIFT_ANGLES},
               "b": {a: {"accuracy": 0.5, "ece": 0.1} for a in bm.SHIFT_ANGLES}}
    fig = bm.plot_shift(results, path=tmp_path / "shift.png")
    acc_ax, ece_ax = fig.axes[:2]
    assert [line.get_label() for line in ece_ax.get_lines()] == ["a", "b"]
    assert list(acc_ax.get_lines()[0].get_ydata()) == [1 - a / 200 for a in bm.SHIFT_ANGLES]
    assert len(fig.axes) == 2 and list(acc_ax.get_lines()[0].get_xdata()) == list(bm.SHIFT_ANGLES)  # x: degrees
    net = ready_net()
    with torch.no_grad():
        net.rho["fc1_weight"][:, 5] = bm.inverse_softplus(0.7)  # one pixel's weights all wide
    fig = bm.plot_pixel_scales(net, torch.rand(784), path=tmp_path / "scales.png")
    shown = fig.axes[0].get_images()[0].get_array()
    assert shown.shape == (28, 28) and shown[0, 5] == pytest.approx(0.7) and shown[0, 4] == pytest.approx(1e-3)
    assert (tmp_path / "shift.png").stat().st_size > 0 and (tmp_path / "scales.png").stat().st_size > 0


def test_the_run_reports_near_ood_shift_selective_and_control_from_its_own_samples(tmp_path, data_dir, monkeypatch):
    """Every new number of a CLI run recomputed from the probabilities it drew (a spy) and the
    images it scored: the near-OOD AUROCs, the control's, the shift report, selective prediction."""
    from conftest import TINY

    seen = {}
    real = bm.sample_probs_sets

    def spy(sets, net, num_samples=bm.DEFAULTS.unc_samples, *args):
        seen["sets"], seen["probs"] = sets, real(sets, net, num_samples, *args)
        return seen["probs"]

    monkeypatch.setattr(bm, "sample_probs_sets", spy)
    m = bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", *TINY,
                 "--shift-size", "80", "--selective-measure", "expected_entropy", "--max-batches", "1",
                 "--init-scale", "0.3"])  # barely trained: errors to rank, measures that disagree
    sets, probs = seen["sets"], seen["probs"]
    u = {n: bm.uncertainty(p) for n, p in probs.items()}
    x, y = bm.load_mnist(data_dir)
    x_test, y_test = bm.load_mnist(data_dir, train=False)
    pick, shift, near = bm.shifted_sets(x_test, y_test, 80)
    assert list(m["near_ood_auroc"]) == list(bm.NEAR_OOD)
    for name in bm.NEAR_OOD:
        assert torch.equal(sets[name], near[name]), name
        assert m["near_ood_auroc"][name]["mutual_information"] == bm.auroc(u["MNIST"]["mutual_information"],
                                                                         u[name]["mutual_information"])
    freq = (bm.holdout_split(x, y, 100)[0] > 0).float().mean(0)  # the training split's inking
    score = lambda v: (v / (freq + 1e-4)).sum(1)  # noqa: E731
    assert m["control_auroc"]["noise"] == pytest.approx(bm.auroc(score(x_test), score(sets["noise"])))
    assert m["control_auroc"]["mirrored"] == pytest.approx(bm.auroc(score(x_test), score(bm.mirror(x_test[pick]))))
    assert list(m["shift"]) == list(bm.SHIFT_ANGLES)  # (metrics.json's keys are their strings)
    at45 = probs["rotated 45"].mean(0)
    assert torch.equal(sets["rotated 45"], shift[45])
    assert m["shift"][45]["accuracy"] == pytest.approx(float((at45.argmax(1) == y_test[pick]).float().mean()))
    assert m["shift"][0]["nll"] == pytest.approx(bm.evaluate(probs["MNIST"][:, pick].mean(0), y_test[pick])["nll"])
    correct = probs["MNIST"].mean(0).argmax(1) == y_test
    assert m["selective_measure"] == "expected_entropy"
    assert 0.1 < float(correct.float().mean()) < 0.95  # some right, some wrong
    for measure in bm.MEASURES:
        assert m["selective"][measure] == bm.risk_coverage(u["MNIST"][measure], correct)
    assert len({m["selective"][measure]["aurc"] for measure in bm.MEASURES}) == 4  # each its own ranking
