"""The model, the guide, SVI training, prediction and saving, checked in-process."""

import math
from functools import partial

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

import bnn_mnist as bm
from conftest import ready_net

H = 16  # a small hidden layer keeps these tests fast


def traces(x, y, net, num_data):
    guide_trace = poutine.trace(bm.guide).get_trace(x, y, num_data, net=net)  # outside SVI: a store entry
    model_trace = poutine.trace(poutine.replay(bm.model, trace=guide_trace)).get_trace(
        x, y, num_data, net=net)
    return model_trace, guide_trace


def test_site_shapes_and_plate_scale(small_data):
    x, y, _, _ = small_data
    net = bm.BNN(784, H, 10)
    model_trace, guide_trace = traces(x[:50], y[:50], net, num_data=600)
    expected = {"fc1_weight": (H, 784), "fc1_bias": (H,), "out_weight": (10, H), "out_bias": (10,)}
    for name, shape in expected.items():
        site = model_trace.nodes[name]
        assert site["value"].shape == shape and site["fn"].event_shape == shape and site["fn"].batch_shape == ()
        assert guide_trace.nodes[name]["fn"].event_shape == shape
    obs = model_trace.nodes["obs"]
    assert obs["fn"].batch_shape == (50,) and obs["is_observed"]
    assert obs["scale"] == pytest.approx(600 / 50)  # a minibatch stands for the whole data set
    model_trace.compute_log_prob()  # with validation on: shapes agree with the plate


def test_guide_starts_at_the_layer_init_with_small_scales():
    torch.manual_seed(0)
    net = bm.BNN(784, H, 10, init_scale=0.01)
    torch.manual_seed(0)
    fc1 = torch.nn.Linear(784, H)  # the same init as the BNN's first layer
    assert torch.equal(net.loc["fc1_weight"].detach(), fc1.weight.detach())
    assert torch.allclose(F.softplus(net.rho["out_bias"]), torch.full((10,), 0.01))
    assert not net.trained


def test_elbo_is_the_full_data_elbo_and_both_estimators_agree(small_data):
    """-ELBO = N * E[-log p(y|x,w)] per-image average + KL(q || p): Trace_ELBO's sampled KL and
    TraceMeanField_ELBO's exact KL estimate the same number (the KL is counted once)."""
    x, y, _, _ = small_data
    net = bm.BNN(784, H, 10, init_scale=0.05)
    m = lambda *a: bm.model(*a, net=net, kl_weight=1.0)  # noqa: E731  (the article's ELBO)
    g = lambda *a: bm.guide(*a, net=net, kl_weight=1.0)  # noqa: E731
    with pyro.get_param_store().scope():
        trace = sum(Trace_ELBO().loss(m, g, x[:64], y[:64], 600) for _ in range(400)) / 400
        exact = sum(TraceMeanField_ELBO().loss(m, g, x[:64], y[:64], 600) for _ in range(50)) / 50
    kl = sum(torch.distributions.kl_divergence(net.q(k).base_dist, torch.distributions.Normal(0.0, 1.0)).sum()
             for k in net.loc).item()
    # the mean-network log-likelihood of the batch, scaled to the 600 images, plus the KL
    nll = F.cross_entropy(bm.bnn_forward(dict(net.loc), x[:64]), y[:64], reduction="sum").item() * 600 / 64
    assert exact == pytest.approx(nll + kl, rel=0.02)
    assert trace == pytest.approx(exact, rel=0.02)
    assert kl > 1000  # so a KL counted per batch (x 9.4) or dropped would fail the first assert
    # a tempered ELBO: the KL term weighted by kl_weight, in the model and the guide alike
    m = lambda *a: bm.model(*a, net=net, kl_weight=0.1)  # noqa: E731
    g = lambda *a: bm.guide(*a, net=net, kl_weight=0.1)  # noqa: E731
    with pyro.get_param_store().scope():
        tempered = sum(Trace_ELBO().loss(m, g, x[:64], y[:64], 600) for _ in range(400)) / 400
    assert tempered == pytest.approx(nll + 0.1 * kl, rel=0.02)
    svi, _ = bm.make_svi(net, lr=0.01, kl_weight=0.1)  # what training optimises
    with pyro.get_param_store().scope():
        trained_loss = sum(svi.evaluate_loss(x[:64], y[:64], 600) for _ in range(400)) / 400
    assert trained_loss == pytest.approx(nll + 0.1 * kl, rel=0.02)
    svi, _ = bm.make_svi(net, lr=0.01, kl_weight=0.1, elbo="local")  # the same objective, per-image draws
    with pyro.get_param_store().scope():
        local_loss = sum(svi.evaluate_loss(x[:64], y[:64], 600) for _ in range(400)) / 400
    assert local_loss == pytest.approx(nll + 0.1 * kl, rel=0.02)


def test_local_reparameterization_weighs_the_exact_kl_to_the_models_prior():
    """--elbo local: the same draws at kl_weight 0.7 and 0 differ by 0.7 KL(q || p), with p the
    prior the model uses, N(0, 0.5)."""
    net = bm.BNN(784, H, 10, init_scale=0.1, prior_scale=0.5)
    x, y = torch.rand(8, 784), torch.randint(0, 10, (8,))
    losses = []
    for kl_weight in (0.7, 0.0):
        torch.manual_seed(0)
        losses.append(bm.local_reparam_loss(None, None, x, y, 100, net=net, kl_weight=kl_weight).item())
    kl = sum(torch.distributions.kl_divergence(net.q(k).base_dist, torch.distributions.Normal(0.0, 0.5)).sum().item()
             for k in net.loc)
    assert losses[0] - losses[1] == pytest.approx(0.7 * kl, rel=1e-4)


def test_local_reparameterization_estimates_the_same_elbo_with_less_noise(small_data):
    """--elbo local: E[loss] is TraceMeanField_ELBO's on (model, guide), at wide scales where the
    likelihood term is a large part; each image's own draw averages out in the minibatch's sum, so
    the estimate (and the gradient of the scales) varies less than with one shared weight set."""
    x, y, _, _ = small_data
    pyro.set_rng_seed(0)
    net = bm.BNN(784, H, 10, init_scale=0.3)
    m = lambda *a: bm.model(*a, net=net, kl_weight=0.01)  # noqa: E731
    g = lambda *a: bm.guide(*a, net=net, kl_weight=0.01)  # noqa: E731

    def draws(loss):
        values, grads = [], []
        for _ in range(300):
            value = loss(m, g, x[:64], y[:64], 600)
            value.backward()
            values.append(value.item())
            grads.append(net.rho["fc1_weight"].grad.sum().item())
            net.rho["fc1_weight"].grad = None
        return torch.tensor(values, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)

    with pyro.get_param_store().scope():
        shared, shared_grad = draws(TraceMeanField_ELBO().differentiable_loss)
        local, local_grad = draws(partial(bm.local_reparam_loss, net=net, kl_weight=0.01))
    assert shared.mean() > 1.5 * 0.01 * sum(  # the likelihood term is no small part: a wrong one would show
        torch.distributions.kl_divergence(net.q(k).base_dist, torch.distributions.Normal(0.0, 1.0)).sum().item()
        for k in net.loc)
    standard_error = math.sqrt((shared.var() + local.var()) / 300)
    assert abs(local.mean() - shared.mean()) < 4 * standard_error
    assert local.std() < 0.5 * shared.std()
    assert local_grad.std() < 0.5 * shared_grad.std()


@pytest.mark.parametrize("elbo", bm.ELBOS)
def test_elbo_falls_and_same_seed_same_losses(small_data, elbo):
    x, y, _, _ = small_data
    kw = dict(epochs=4, batch_size=64, lr=1e-2, lr_decay=1.0, kl_weight=1.0, scale_lr_factor=1.0, progress=False,
              elbo=elbo, log=lambda *a: None)  # the article's ELBO, by each estimator
    runs = []
    for _ in range(2):
        pyro.set_rng_seed(0)
        net = bm.BNN(784, H, 10)
        runs.append(bm.train(net, x, y, validate=True, **kw)["losses"])
    assert runs[0] == runs[1]  # bit-identical on the CPU
    losses = runs[0]  # -ELBO per example, dominated here by the KL of 12.7k weights over 600 images
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 2


def test_trained_net_predicts_and_probabilities_sum_to_one(small_data):
    x, y, xt, yt = small_data
    net = bm.BNN(784, H, 10)
    bm.train(net, x, y, epochs=3, batch_size=64, lr=1e-2, progress=False, log=lambda *a: None)
    samples = bm.sample_probs(xt, net, 7)
    assert samples.shape == (7, 200, 10)
    assert torch.allclose(samples.sum(-1), torch.ones(7, 200), atol=1e-5)
    probs = bm.predict_prob(xt, net)
    assert probs.shape == (200, 10) and torch.allclose(probs.sum(-1), torch.ones(200), atol=1e-5)
    assert (bm.predict(xt, net) == yt).float().mean() > 0.9  # separable data


def test_prediction_averages_probabilities_not_logits():
    net = ready_net(H, init_scale=1e-30)
    x = torch.rand(5, 784)
    # With (almost) zero guide variance the predictive is softmax(net(x)) at the means.
    assert torch.allclose(bm.predict_prob(x, net, 3), torch.softmax(net(x), -1), atol=1e-6)
    # With very noisy output biases the samples disagree confidently: the mean of their
    # probabilities is spread out, the softmax of their mean logits (the article) is not.
    net.rho["out_bias"].data.fill_(bm.inverse_softplus(50.0))
    pyro.set_rng_seed(4)
    logits = bm.bnn_forward(bm.sample_weights(net, 200), x)  # (200, 5, 10)
    by_probs, by_logits = torch.softmax(logits, -1).mean(0), torch.softmax(logits.mean(0), -1)
    pyro.set_rng_seed(4)
    probs = bm.predict_prob(x, net, 200)
    assert torch.allclose(probs, by_probs, atol=1e-6)
    assert (by_logits.max(-1).values - probs.max(-1).values).min() > 0.2


@pytest.mark.parametrize("shape", [(4, 784), (4, 28, 28), (4, 1, 28, 28)])
def test_input_shapes_give_the_same_prediction(shape):
    net = ready_net(H)
    x = torch.rand(4, 784)
    pyro.set_rng_seed(1)
    ref = bm.predict_prob(x, net)
    pyro.set_rng_seed(1)
    assert torch.equal(bm.predict_prob(x.reshape(shape), net), ref)


def test_chunked_prediction_matches_and_stays_valid():
    net = ready_net(H, init_scale=0.3)
    x = torch.rand(300, 784)
    pyro.set_rng_seed(2)
    whole = bm.sample_probs(x, net, 1)
    pyro.set_rng_seed(2)
    chunked = bm.sample_probs(x, net, 1, max_elements=H * 7)  # 7 images at a time
    assert torch.allclose(whole, chunked, atol=1e-6)
    many = bm.sample_probs(x, net, 33, max_elements=H * 50)  # chunks over samples too
    assert many.shape == (33, 300, 10) and torch.allclose(many.sum(-1), torch.ones(33, 300), atol=1e-5)
    assert many.std(0).mean() > 0  # the chunks hold different samples


def test_save_and_load_guide_round_trip(tmp_path, small_data):
    _, _, xt, _ = small_data
    net = ready_net(H, init_scale=0.1)
    pyro.set_rng_seed(5)
    before = bm.predict_prob(xt, net)
    bm.save_guide(tmp_path / "guide.pt", net, prior_scale=1.0)
    loaded = bm.load_guide(tmp_path / "guide.pt")
    assert loaded.sizes == (784, H, 10)
    pyro.set_rng_seed(5)
    assert torch.equal(bm.predict_prob(xt, loaded), before)


def test_load_guide_errors(tmp_path):
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(bm.Error, match="format 'something-else'"):
        bm.load_guide(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(bm.Error, match="not a readable bnn_mnist file"):
        bm.load_guide(tmp_path / "junk.pt")
    with pytest.raises(bm.Error, match="no such file"):
        bm.load_guide(tmp_path / "missing.pt")
    net = ready_net(H)
    bm.save_guide(tmp_path / "g.pt", net, 1.0)
    obj = torch.load(tmp_path / "g.pt", weights_only=True)
    obj["settings"]["hidden_size"] = 2 * H
    torch.save(obj, tmp_path / "g.pt")
    with pytest.raises(bm.Error, match="different --hidden-size"):
        bm.load_guide(tmp_path / "g.pt")


def test_meanfield_elbo_option_trains(small_data):
    x, y, _, _ = small_data
    net = bm.BNN(784, H, 10)
    out = bm.train(net, x, y, epochs=2, batch_size=64, lr=1e-2, elbo="meanfield", validate=True,
                   progress=False, log=lambda *a: None)
    assert len(out["losses"]) == 2 and all(math.isfinite(v) for v in out["losses"])


def test_two_nets_in_one_notebook_keep_their_own_posteriors(tmp_path, small_data):
    """Trained side by side, saved, loaded in either order: each predicts as in its own run."""
    x, y, xt, _ = small_data
    nets, expected = [], []
    for seed, lr in ((0, 1e-2), (1, 3e-2)):
        pyro.set_rng_seed(seed)
        net = bm.BNN(784, H, 10)
        bm.train(net, x, y, epochs=2, batch_size=64, lr=lr, progress=False, log=lambda *a: None)
        bm.save_guide(tmp_path / f"g{seed}.pt", net)
        pyro.set_rng_seed(9)
        expected.append(bm.predict_prob(xt, net, 5))
        nets.append(net)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # two different posteriors
    loaded = [bm.load_guide(tmp_path / "g0.pt"), bm.load_guide(tmp_path / "g1.pt")]
    for net in (*loaded, *nets):  # every one is still its own, whatever was loaded or trained last
        pyro.set_rng_seed(9)
        got = bm.predict_prob(xt, net, 5)
        i = (nets + loaded).index(net) % 2
        assert torch.equal(got, expected[i])
    assert list(pyro.get_param_store().keys()) == []  # the global store was never the owner


def test_untrained_or_mismatched_net_raises_clear_errors(tmp_path):
    net = bm.BNN(784, H, 10)
    for call in (lambda: bm.predict_prob(torch.rand(2, 784), net), lambda: net(torch.rand(2, 784)),
                 lambda: bm.pyro_predictive_prob(torch.rand(2, 784), net)):
        with pytest.raises(bm.Error) as e:
            call()
        assert str(e.value) == "this BNN has no trained posterior: train it (bm.train) or load one (bm.load_guide)"
    with pytest.raises(ValueError) as e:
        bm.BNN(784, H, 10, init="xavier")
    assert str(e.value) == "init must be one of torch, article, got 'xavier'"
    trained = ready_net(H)
    bm.save_guide(tmp_path / "g.pt", trained)
    bigger = bm.BNN(784, 2 * H, 10)
    obj = torch.load(tmp_path / "g.pt", weights_only=True)
    with pytest.raises(bm.Error, match=r"holds loc.fc1_bias of shape \(16,\), but this BNN needs \(32,\)"):
        bm.load_net_state(bigger, obj["net"], "g.pt")
    extra = dict(obj["net"], **{"loc.fc2_weight": torch.zeros(1), "loc.fc0_bias": torch.zeros(1)})
    with pytest.raises(bm.Error) as e:
        bm.load_net_state(bm.BNN(784, H, 10), extra, "g.pt")
    assert str(e.value) == "g.pt holds parameters this BNN does not have: loc.fc0_bias, loc.fc2_weight"
    del obj["net"]["rho.out_bias"]
    with pytest.raises(bm.Error, match="g.pt has no parameter rho.out_bias"):
        bm.load_net_state(bm.BNN(784, H, 10), obj["net"], "g.pt")
    torch.save(obj, tmp_path / "broken.pt")
    with pytest.raises(bm.Error) as e:
        bm.load_guide(tmp_path / "broken.pt")
    assert str(e.value) == f"{tmp_path / 'broken.pt'} has no parameter rho.out_bias"  # load_guide names its file


def test_hand_written_svi_with_two_nets_is_refused_not_mixed_up(small_data):
    x, y, _, _ = small_data
    a, b = bm.BNN(784, H, 10), bm.BNN(784, H, 10)
    svi_a, _ = bm.make_svi(a, lr=1e-2)
    svi_a.step(x[:32], y[:32], 600)  # by hand, in the global store, as the article does
    svi_b, _ = bm.make_svi(b, lr=1e-2)
    with pytest.raises(ValueError, match=r"^Pyro's param store holds another BNN's posterior: run SVI by hand inside "
                                         r"`with pyro\.get_param_store\(\)\.scope\(\):` \(as bm\.train does\), "
                                         r"or pyro\.clear_param_store\(\)\n"):  # Pyro adds the trace's shapes below
        svi_b.step(x[:32], y[:32], 600)
    with pyro.get_param_store().scope():  # the fix the message gives
        before = b.loc["out_bias"].detach().clone()
        svi_b.step(x[:32], y[:32], 600)
        assert not torch.equal(before, b.loc["out_bias"])


def test_predictive_gives_the_same_posterior_predictive(small_data):
    _, _, xt, _ = small_data
    net = ready_net(H, init_scale=0.2)
    pyro.set_rng_seed(0)
    ours = bm.predict_prob(xt[:20], net, 3000)
    pyro.set_rng_seed(1)
    theirs = bm.pyro_predictive_prob(xt[:20], net, 3000)
    assert (ours - theirs).abs().mean() < 0.012  # two Monte Carlo estimates of one predictive (noise ~0.004)
    assert (ours - bm.predict_prob(xt[:20], net, 1)).abs().mean() > 0.05  # which one sample is not (~0.1)


def test_a_posterior_gone_non_finite_is_one_clear_error_at_the_end_of_training_or_epoch(small_data, monkeypatch,
                                                                                       tmp_path):
    """Without a checkpoint file nothing is saved per epoch: the end of training checks the posterior."""
    x, y, _, _ = small_data
    epoch = bm.train_epoch

    def then_a_nan(svi, *a, **k):
        loss = epoch(svi, *a, **k)
        with torch.no_grad():
            net.loc["out_bias"][0] = float("nan")  # the loss was finite, the parameter is not
        return loss

    net = bm.BNN(784, 8, 10)
    monkeypatch.setattr(bm, "train_epoch", then_a_nan)
    with pytest.raises(bm.Error) as e:
        bm.train(net, x[:64], y[:64], epochs=1, batch_size=64, progress=False, log=lambda *a: None)
    assert str(e.value) == "a parameter became non-finite (at the end of training)"
    net = bm.BNN(784, 8, 10)  # with a checkpoint file, each epoch's end checks before it saves
    with pytest.raises(bm.Error) as e:
        bm.train(net, x[:64], y[:64], epochs=2, batch_size=64, progress=False, log=lambda *a: None,
                 checkpoint_path=tmp_path / "c.pt")
    assert str(e.value) == "a parameter became non-finite (end of epoch 1; last good checkpoint kept)"
    assert not (tmp_path / "c.pt").exists()
