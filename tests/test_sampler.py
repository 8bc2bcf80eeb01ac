"""The per-image sampler draws what weight-set sampling draws: known moments of a one-unit net,
and, for fixed images, both samplers' mean probabilities and mutual information within sampling
error of each other."""

import math

import pyro
import pytest
import torch

import bnn_mnist as bm


def one_unit_net():
    """784-1-10: pixel 0 feeds the hidden unit with weight N(0.5, 0.8^2), bias N(0.2, 0.6^2)."""
    net = bm.BNN(784, 1, 10)
    with torch.no_grad():
        for k in net.loc:
            net.loc[k].zero_()
            net.rho[k].fill_(bm.inverse_softplus(0.3))
        net.loc["fc1_weight"][0, 0], net.rho["fc1_weight"][0, 0] = 0.5, bm.inverse_softplus(0.8)
        net.loc["fc1_bias"][0], net.rho["fc1_bias"][0] = 0.2, bm.inverse_softplus(0.6)
        net.loc["out_weight"][:, 0] = torch.linspace(-1, 1, 10)
        net.rho["out_weight"][:, 0] = bm.inverse_softplus(torch.linspace(0.1, 1.0, 10))
        net.loc["out_bias"][:] = torch.linspace(0.5, -0.5, 10)
    net.trained.fill_(True)
    return net


def relu_moments(m, s):
    """E[relu(z)] and E[relu(z)^2] for z ~ N(m, s^2)."""
    phi, cdf = math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(m / s / math.sqrt(2)))
    return m * cdf + s * phi, (m * m + s * s) * cdf + m * s * phi


@pytest.mark.parametrize("pixel", [1.0, 0.5])
def test_a_one_unit_nets_logits_have_their_closed_form_moments(pixel):
    """The pre-activation is N(0.5 x + 0.2, 0.64 x^2 + 0.36): x = 0.5 tells x^2 from x."""
    net = one_unit_net()
    x = torch.zeros(1, 784)
    x[0, 0] = pixel
    logits = bm.sample_logits_local(x, net, 400_000, generator=torch.Generator().manual_seed(0))[:, 0]  # (S, 10)
    e_h, e_h2 = relu_moments(0.5 * pixel + 0.2, math.sqrt(0.64 * pixel**2 + 0.36))
    w, sw = net.loc["out_weight"][:, 0].detach(), torch.nn.functional.softplus(net.rho["out_weight"][:, 0]).detach()
    b, sb = net.loc["out_bias"].detach(), 0.3
    mean = e_h * w + b
    var = e_h2 * (w**2 + sw**2) - (e_h * w) ** 2 + sb**2
    se = (var / len(logits)).sqrt()
    assert ((logits.mean(0) - mean).abs() < 4 * se).all()
    assert torch.allclose(logits.var(0), var, rtol=0.02)


def small_posterior(hidden=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = bm.BNN(784, hidden, 10)
    with torch.no_grad():
        for k in net.loc:
            net.loc[k].copy_(torch.randn(net.loc[k].shape, generator=g) * 0.3)
            net.rho[k].fill_(bm.inverse_softplus(0.3))
    net.trained.fill_(True)
    return net


def test_both_samplers_agree_on_each_images_predictive_and_mutual_information():
    net = small_posterior()
    x = torch.rand(6, 784, generator=torch.Generator().manual_seed(1)) ** 3  # dim and bright pixels
    pyro.set_rng_seed(0)
    local, weights = bm.sample_probs_local(x, net, 40_000), bm.sample_probs(x, net, 40_000)  # (S, 6, 10)
    se = ((local.var(0) + weights.var(0)) / 40_000).sqrt()
    assert ((local.mean(0) - weights.mean(0)).abs() < 5 * se + 1e-4).all()
    mi_local, mi_weights = (bm.uncertainty(p)["mutual_information"] for p in (local, weights))
    assert mi_local.min() > 0.05  # the samples do disagree: the test can see a wrong spread
    assert torch.allclose(mi_local, mi_weights, rtol=0.03)
    ee_local, ee_weights = (bm.uncertainty(p)["expected_entropy"] for p in (local, weights))
    assert torch.allclose(ee_local, ee_weights, rtol=0.03)


def test_local_samples_are_reproducible_from_a_generator_and_leave_the_global_rng_alone():
    net, x = small_posterior(), torch.rand(3, 784)
    state = torch.get_rng_state()
    a = bm.sample_probs_local(x, net, 50, generator=torch.Generator().manual_seed(7))
    b = bm.sample_probs_local(x, net, 50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
    assert a.shape == (50, 3, 10) and torch.allclose(a.sum(-1), torch.ones(50, 3))


def test_chunking_changes_nothing():
    net, x = small_posterior(), torch.rand(37, 784)
    whole = bm.sample_logits_local(x, net, 9, generator=torch.Generator().manual_seed(3))
    pieces = bm.sample_logits_local(x, net, 9, generator=torch.Generator().manual_seed(3), max_elements=5 * 16)
    assert torch.allclose(whole, pieces, atol=1e-6)


def test_the_report_and_the_rule_use_the_sampler_asked_for(monkeypatch):
    net, x = small_posterior(), torch.rand(20, 784)
    called = []
    for name in ("sample_probs_local", "sample_probs"):
        monkeypatch.setattr(bm, name, lambda *a, _f=getattr(bm, name), _n=name, **k: called.append(_n) or _f(*a, **k))
    bm.refusal_rule(x, net, num_samples=5)
    bm.sample_probs_sets({"a": x}, net, 5, sampler="weights")
    bm.predict_or_abstain(x, net, {"mutual_information": 0.1}, num_samples=5)
    assert called == ["sample_probs_local", "sample_probs", "sample_probs_local"]


def test_each_image_takes_its_own_noise_so_copies_of_an_image_get_different_draws():
    """Numbers over many images need images' draws nearly independent: 300 copies of one image
    get different sets of samples (shared noise would give one set 300 times; two copies share
    one only when their random offsets into the pool collide, a few times in 300), whose mutual
    information scatters around the value many samples give."""
    net, x = small_posterior(), torch.rand(1, 784, generator=torch.Generator().manual_seed(2)) ** 3
    pyro.set_rng_seed(0)
    copies = bm.uncertainty(bm.sample_probs_local(x.repeat(300, 1), net, 50))["mutual_information"]  # (300,)
    many = bm.uncertainty(bm.sample_probs_local(x, net, 30_000))["mutual_information"]
    assert len(torch.unique(copies)) > 280 and copies.std() > 0.05 * copies.mean()
    assert abs(copies.mean() - many[0]) < 0.1 * many[0]  # 50 samples: the plug-in estimate is a few % low
