"""The model, the guide, SVI training, prediction and saving, checked in-process."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import TraceMeanField_ELBO

import bnn_mnist as bm

H = 16  # a small hidden layer keeps these tests fast


def traces(x, y, net, num_data):
    guide_trace = poutine.trace(bm.guide).get_trace(x, y, num_data, net=net)
    model_trace = poutine.trace(poutine.replay(bm.model, trace=guide_trace)).get_trace(
        x, y, num_data, net=net)
    return model_trace, guide_trace


def test_site_shapes_and_plate_scale(small_data):
    x, y, _, _ = small_data
    net = bm.BNN(784, H, 10)
    model_trace, guide_trace = traces(x[:50], y[:50], net, num_data=600)
    expected = {"fc1.weight": (H, 784), "fc1.bias": (H,), "out.weight": (10, H), "out.bias": (10,)}
    for name, shape in expected.items():
        site = model_trace.nodes[name]
        assert site["value"].shape == shape and site["fn"].event_shape == shape and site["fn"].batch_shape == ()
        assert guide_trace.nodes[name]["fn"].event_shape == shape
    obs = model_trace.nodes["obs"]
    assert obs["fn"].batch_shape == (50,) and obs["is_observed"]
    assert obs["scale"] == pytest.approx(600 / 50)  # a minibatch stands for the whole data set
    model_trace.compute_log_prob()  # with validation on: shapes agree with the plate


def test_guide_starts_at_the_layer_init_with_small_scales():
    net = bm.BNN(784, H, 10)
    bm.guide(None, net=net, init_scale=0.01)
    store = pyro.get_param_store()
    assert torch.equal(store["fc1.weight_loc"], net.fc1.weight.detach())
    assert torch.allclose(F.softplus(store["out.bias_rho"]), torch.full((10,), 0.01))


def test_lean_elbo_equals_pyros_meanfield_elbo(small_data):
    x, y, _, _ = small_data
    net = bm.BNN(784, H, 10)
    bm.guide(None, net=net)
    model = lambda *a: bm.model(*a, net=net)  # noqa: E731
    guide = lambda *a: bm.guide(*a, net=net)  # noqa: E731
    losses = []
    for elbo, validate in ((TraceMeanField_ELBO(), True), (bm.MeanFieldELBO(), False)):
        pyro.set_rng_seed(3)
        with pyro.validation_enabled(validate):
            losses.append(elbo.loss(model, guide, x[:64], y[:64], 600))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_elbo_falls_and_same_seed_same_losses(small_data):
    x, y, _, _ = small_data
    kw = dict(epochs=4, batch_size=64, lr=1e-2, lr_decay=1.0, progress=False, log=lambda *a: None)
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
    net = bm.BNN(784, H, 10)
    bm.guide(None, net=net, init_scale=1e-30)
    x = torch.rand(5, 784)
    # With (almost) zero guide variance the predictive is softmax(net(x)) at the means.
    assert torch.allclose(bm.predict_prob(x, net, 3), torch.softmax(net(x), -1), atol=1e-6)
    # With very noisy output biases the samples disagree confidently: the mean of their
    # probabilities is spread out, the softmax of their mean logits (the article) is not.
    pyro.get_param_store()["out.bias_rho"].data.fill_(bm.inverse_softplus(50.0))
    pyro.set_rng_seed(4)
    logits = bm.bnn_forward(bm.sample_weights(net, 200), x)  # (200, 5, 10)
    by_probs, by_logits = torch.softmax(logits, -1).mean(0), torch.softmax(logits.mean(0), -1)
    pyro.set_rng_seed(4)
    probs = bm.predict_prob(x, net, 200)
    assert torch.allclose(probs, by_probs, atol=1e-6)
    assert (by_logits.max(-1).values - probs.max(-1).values).min() > 0.2


@pytest.mark.parametrize("shape", [(4, 784), (4, 28, 28), (4, 1, 28, 28)])
def test_input_shapes_give_the_same_prediction(shape):
    net = bm.BNN(784, H, 10)
    bm.guide(None, net=net)
    x = torch.rand(4, 784)
    pyro.set_rng_seed(1)
    ref = bm.predict_prob(x, net)
    pyro.set_rng_seed(1)
    assert torch.equal(bm.predict_prob(x.reshape(shape), net), ref)


def test_chunked_prediction_matches_and_stays_valid():
    net = bm.BNN(784, H, 10)
    bm.guide(None, net=net, init_scale=0.3)
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
    net = bm.BNN(784, H, 10)
    bm.guide(None, net=net, init_scale=0.1)
    pyro.set_rng_seed(5)
    before = bm.predict_prob(xt, net)
    bm.save_guide(tmp_path / "guide.pt", net, prior_scale=1.0)
    pyro.clear_param_store()
    loaded = bm.load_guide(tmp_path / "guide.pt")
    assert loaded.fc1.out_features == H
    pyro.set_rng_seed(5)
    assert torch.equal(bm.predict_prob(xt, loaded), before)


def test_load_guide_errors(tmp_path):
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="format 'something-else'"):
        bm.load_guide(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable bnn_mnist file"):
        bm.load_guide(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        bm.load_guide(tmp_path / "missing.pt")
    net = bm.BNN(784, H, 10)
    bm.guide(None, net=net)
    bm.save_guide(tmp_path / "g.pt", net, 1.0)
    obj = torch.load(tmp_path / "g.pt", weights_only=False)
    obj["settings"]["hidden_size"] = 2 * H
    torch.save(obj, tmp_path / "g.pt")
    with pytest.raises(ValueError, match="different --hidden-size"):
        bm.load_guide(tmp_path / "g.pt")


def test_trace_elbo_option_trains(small_data):
    x, y, _, _ = small_data
    net = bm.BNN(784, H, 10)
    out = bm.train(net, x, y, epochs=2, batch_size=64, lr=1e-2, elbo="trace", validate=True,
                   progress=False, log=lambda *a: None)
    assert len(out["losses"]) == 2 and all(math.isfinite(v) for v in out["losses"])
