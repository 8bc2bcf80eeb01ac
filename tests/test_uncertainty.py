"""Uncertainty measures, AUROC, calibration and abstention against known answers."""

import math

import pytest
import torch

import bnn_mnist as bm
from conftest import ready_net


def test_entropy_of_uniform_and_one_hot():
    assert bm.entropy(torch.full((10,), 0.1)).item() == pytest.approx(math.log(10))
    assert bm.entropy(torch.eye(10)[3]).item() == 0


def test_mutual_information_zero_when_samples_agree_and_positive_when_not():
    p = torch.softmax(torch.randn(1, 6, 10), -1).expand(20, 6, 10)  # 20 identical samples
    u = bm.uncertainty(p)
    assert torch.allclose(u["mutual_information"], torch.zeros(6), atol=1e-6)
    assert torch.allclose(u["predictive_entropy"], u["expected_entropy"], atol=1e-6)
    # two confident samples that disagree: total log 2, aleatoric 0, epistemic log 2
    q = torch.stack([torch.eye(10)[0], torch.eye(10)[1]])[:, None]  # (2, 1, 10)
    u = bm.uncertainty(q)
    assert u["predictive_entropy"].item() == pytest.approx(math.log(2))
    assert u["expected_entropy"].item() == pytest.approx(0, abs=1e-6)
    assert u["mutual_information"].item() == pytest.approx(math.log(2))
    assert u["max_prob"].item() == pytest.approx(0.5)


def test_auroc_known_answers():
    assert bm.auroc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.9])) == 1.0
    assert bm.auroc(torch.tensor([0.5, 0.9]), torch.tensor([0.1, 0.2, 0.3])) == 0.0
    assert bm.auroc(torch.full((7,), 0.4), torch.full((3,), 0.4)) == 0.5
    # one out-of-distribution score ties an in-distribution one: counted half
    assert bm.auroc(torch.tensor([0.1, 0.5]), torch.tensor([0.5, 0.9])) == pytest.approx(0.875)


def test_ece_of_a_perfectly_calibrated_set_is_zero():
    # 10 images at confidence 0.8, 8 of them right; 10 at 0.6, 6 right
    probs = torch.zeros(20, 10)
    probs[:10, 0], probs[:10, 1:] = 0.8, 0.2 / 9
    probs[10:, 0], probs[10:, 1:] = 0.6, 0.4 / 9
    y = torch.tensor([0] * 8 + [1] * 2 + [0] * 6 + [1] * 4)
    assert bm.expected_calibration_error(probs, y) == pytest.approx(0, abs=1e-6)
    # overconfident: always 1.0 but 14 of 20 right -> ECE 0.3
    one_hot = torch.eye(10)[torch.zeros(20, dtype=torch.long)]
    assert bm.expected_calibration_error(one_hot, y) == pytest.approx(0.3)
    m = bm.evaluate(probs, y)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["nll"] == pytest.approx(-(8 * math.log(0.8) + 2 * math.log(0.2 / 9) + 6 * math.log(0.6)
                                       + 4 * math.log(0.4 / 9)) / 20)


def test_abstention_arithmetic_and_coverage_curve():
    score = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.9])
    correct = torch.tensor([True, True, False, True, False])
    a = bm.abstention(score > 0.25, correct)
    assert a == {"coverage": 0.6, "refused": pytest.approx(0.4), "accuracy_accepted": pytest.approx(2 / 3)}
    cov, acc = bm.accuracy_coverage_curve(score, correct)
    assert torch.allclose(cov, torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0]))
    assert torch.allclose(acc, torch.tensor([1.0, 1.0, 2 / 3, 0.75, 0.6]))
    assert math.isnan(bm.abstention(score > -1, correct)["accuracy_accepted"])


def test_predict_or_abstain_refuses_where_samples_disagree():
    net = ready_net(16, init_scale=1e-30)
    x = torch.rand(4, 784)
    out = bm.predict_or_abstain(x, net, {"mutual_information": 0.01}, num_samples=30)
    assert torch.equal(out, torch.softmax(net(x), -1).argmax(-1))  # certain: all accepted
    net.rho["out_bias"].data.fill_(bm.inverse_softplus(50.0))
    assert (bm.predict_or_abstain(x, net, {"mutual_information": 0.01}, 30) == -1).all()
    # the ambiguity half of the rule: samples that agree on a flat distribution
    net.rho["out_bias"].data.fill_(bm.inverse_softplus(1e-30))
    for p in net.loc.values():
        p.data.zero_()  # every logit 0: each sample says "any digit, 10% each"
    rule = {"mutual_information": 0.01, "expected_entropy": 2.0}
    assert (bm.predict_or_abstain(x, net, rule, 30) == -1).all()
    assert (bm.predict_or_abstain(x, net, {"mutual_information": 0.01}, 30) >= 0).all()


def test_images_with_equal_scores_are_accepted_in_their_given_order():
    """Ties (the same score, as max_prob gives for many sure digits) keep their order, so the
    accuracy-coverage curve is the same on every machine and run."""
    correct = torch.arange(1000) % 3 == 0  # (B,)
    cov, acc = bm.accuracy_coverage_curve(torch.zeros(1000), correct)
    k = torch.arange(1, 1001)
    assert torch.allclose(acc, correct.float().cumsum(0) / k) and torch.allclose(cov, k / 1000)
