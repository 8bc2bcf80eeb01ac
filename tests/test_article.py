"""The article as written, beside the default: its model and guide untempered when called
alone, its loss (the whole KL once per minibatch), its averaged logits, its median refusal rule,
and `--article` putting the recipe together (known answers, no real data)."""

import pyro
import pytest
import torch
import torch.nn.functional as F

from pyro.poutine.util import site_is_subsample

import bnn_mnist as bm

H = 16


def test_the_default_estimator_is_trace_elbo_on_the_articles_model_and_guide(capsys):
    assert bm.DEFAULTS.elbo == "trace" and bm.parse_args([]).elbo == "trace"
    with pytest.raises(SystemExit):
        bm.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(local reparameterization: faster, see docs/how-it-works.md) (default: trace)" in help_text
    svi, _ = bm.make_svi(bm.BNN(784, H, 10), lr=0.01)
    assert isinstance(svi.loss_and_grads.__self__, pyro.infer.Trace_ELBO)


def test_model_called_with_its_defaults_is_the_articles_joint(small_data):
    """Every site at scale 1: the prior is Normal(0, 1), the likelihood the batch's own."""
    x, y, _, _ = small_data
    net = bm.BNN(784, H, 10)
    guide_tr = pyro.poutine.trace(bm.guide).get_trace(x[:8], y[:8], net=net)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(bm.model, trace=guide_tr)).get_trace(x[:8], y[:8], net=net)
    sites = [s for s in model_tr.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]
    assert [s["name"] for s in sites] == [*net.loc, "obs"]
    assert all(s["scale"] == 1.0 for s in sites)
    assert all(s["scale"] == 1.0 for s in guide_tr.nodes.values() if s["type"] == "sample")
    w = model_tr.nodes["fc1_bias"]["value"]
    log_p = model_tr.nodes["fc1_bias"]["fn"].log_prob(w)
    assert torch.allclose(log_p, torch.distributions.Normal(0.0, 1.0).log_prob(w).sum())


def one_draw_loss(net, x, y, num_data, seed=5, **svi_kwargs):
    """SVI's loss at one guide draw, and that draw's NLL and log q - log p by hand."""
    svi, _ = bm.make_svi(net, lr=0.01, **svi_kwargs)
    with pyro.get_param_store().scope():
        pyro.set_rng_seed(seed)
        loss = svi.evaluate_loss(x, y, num_data)
        pyro.set_rng_seed(seed)
        w = bm.guide(net=net)
    nll = F.cross_entropy(bm.bnn_forward(w, x), y, reduction="sum").item()
    prior = torch.distributions.Normal(0.0, 1.0)
    log_q_minus_p = sum((net.q(k).log_prob(v) - prior.log_prob(v).sum()).item() for k, v in w.items())
    return loss, nll, log_q_minus_p


def test_an_article_minibatch_loss_is_its_nll_plus_the_whole_kl(small_data):
    x, y, _, _ = small_data
    net = bm.BNN(784, H, 10, init="article")
    loss, nll, kl = one_draw_loss(net, x[:32], y[:32], None, elbo="trace", kl_weight=1.0)
    assert loss == pytest.approx(nll + kl, rel=1e-4)
    # the default objective: the NLL scaled to the 600 training images, the KL once and weighted by 0.01
    loss, nll, kl = one_draw_loss(net, x[:32], y[:32], 600)
    assert loss == pytest.approx(600 / 32 * nll + bm.DEFAULTS.kl_weight * kl, rel=1e-4)


def test_kl_per_batch_hands_svi_no_data_set_size():
    class Recording:
        calls = []

        def step(self, *args):
            self.calls.append(args)
            return 1.0

    x, y = torch.rand(10, 784), torch.arange(10)
    for per_batch, expected in ((True, None), (False, 10)):
        svi, state = Recording(), {"epoch": 0, "step": 0, "perm": None, "loss_sum": 0.0}
        bm.train_epoch(svi, x, y, 4, state, 3, kl_per_batch=per_batch)
        assert [c[2] for c in svi.calls] == [expected] * 3
        Recording.calls = []


def test_the_article_init_draws_means_and_rho_from_a_standard_normal():
    net = bm.BNN(784, 256, 10, init="article")
    for group in (net.loc, net.rho):
        values = torch.cat([p.detach().flatten() for p in group.values()])
        assert abs(values.mean().item()) < 0.01 and values.std().item() == pytest.approx(1.0, abs=0.01)
    assert bm.BNN(784, 256, 10).loc["fc1_weight"].std().item() < 0.05  # nn.Linear's init


def test_logits_are_averaged_not_probabilities(monkeypatch):
    """Two samples sure of classes 0 and 1, both giving class 2 a middling logit: the
    probabilities' mean says "0 or 1", the logits' mean says 2."""
    logits = torch.full((2, 1, 10), -10.0)
    logits[0, 0, 0] = logits[1, 0, 1] = 10.0
    logits[:, 0, 2] = 6.0
    monkeypatch.setattr(bm, "sample_logits", lambda x, net, num_samples: logits)
    x = torch.zeros(1, 784)
    assert bm.predict(x, None, 2, average="logits").tolist() == [2]
    assert bm.predict(x, None, 2).item() in (0, 1)
    assert torch.allclose(bm.predict_prob(x, None, 2, average="logits"), logits.mean(0).softmax(-1))
    assert torch.allclose(bm.predict_prob(x, None, 2), logits.softmax(-1).mean(0))
    with pytest.raises(ValueError, match="average must be"):
        bm.predict_prob(x, None, 2, average="median")


def hand_made_samples():
    """(S=4, B=4, 10) sample probabilities. Class 0 carries each image's values over the four
    samples; the rest is spread evenly over classes 1-9 (at most 0.1 each, never the answer)."""
    class0 = torch.tensor([[0.3, 0.3, 0.3, 0.3],    # median 0.3: answered
                           [0.9, 0.15, 0.1, 0.1],   # median 0.125, though the mean is 0.31: refused
                           [0.1, 0.2, 0.2, 0.9],    # median exactly 0.2: refused (the rule needs more)
                           [0.1, 0.15, 0.3, 0.9]])  # median 0.225 (0.15 if not interpolated): answered
    rest = ((1 - class0.T) / 9)[..., None].expand(4, 4, 9)  # (S, B, 9)
    return torch.cat([class0.T[..., None], rest], -1)


def test_the_median_rule_refuses_unless_a_class_median_exceeds_a_fifth():
    probs = hand_made_samples()
    assert torch.allclose(probs.sum(-1), torch.ones(4, 4))
    assert bm.max_median_prob(probs).tolist() == pytest.approx([0.3, 0.125, 0.2, 0.225])
    rule = bm.article_rule()
    assert rule == {"max_median_prob": 0.2}
    assert bm.refuses(bm.scores_for(probs, rule), rule).tolist() == [False, True, True, False]
    assert "max_median_prob" not in bm.scores_for(probs, {"mutual_information": 0.1})


def test_predict_or_abstain_uses_a_saved_article_rule(tmp_path):
    net = bm.BNN(784, H, 10, init="article")
    net.trained.fill_(True)
    bm.save_guide(tmp_path / "g.pt", net, rule=bm.article_rule())
    loaded = bm.load_guide(tmp_path / "g.pt")
    assert loaded.rule == {"max_median_prob": 0.2}
    x = torch.rand(50, 784)
    pyro.set_rng_seed(0)
    answer = bm.predict_or_abstain(x, loaded)
    pyro.set_rng_seed(0)
    probs = bm.sample_probs_local(x, loaded, 100)
    expected = torch.where(bm.max_median_prob(probs) <= 0.2, -1, bm.median_probs(probs).argmax(-1))
    assert torch.equal(answer, expected) and 0 < (answer == -1).sum() < 50


def test_under_the_article_rule_the_answer_is_the_highest_median_not_the_highest_mean(monkeypatch):
    """The sequel answers with the class of the highest median: one sure sample cannot outvote two."""
    probs = torch.zeros(3, 1, 10)
    probs[:, 0, :2] = torch.tensor([[0.95, 0.05], [0.3, 0.7], [0.3, 0.7]])  # mean: class 0; median: class 1
    monkeypatch.setattr(bm, "sample_probs_local", lambda x, net, num_samples: probs)
    net = bm.BNN(784, H, 10)
    assert bm.predict_or_abstain(torch.rand(1, 784), net, bm.article_rule()).tolist() == [1]
    assert bm.predict_or_abstain(torch.rand(1, 784), net, {"mutual_information": 9.0}).tolist() == [0]


def test_article_flag_sets_the_recipe_and_flags_beside_it_win():
    cfg = bm.parse_args(["--article"])
    assert {k: getattr(cfg, k) for k in bm.ARTICLE} == bm.ARTICLE
    assert cfg.kl_per_batch and cfg.val_size == 0 and cfg.rule == "median" and cfg.average == "logits"
    corrected = bm.parse_args(["--article", "--kl-weight", "1"])  # the KL once per data set
    assert corrected.kl_weight == 1.0 and not corrected.kl_per_batch and corrected.lr == 0.01
    assert bm.parse_args(["--article", "--lr", "0.003"]).lr == 0.003
    assert bm.parse_args(["--article", "--kl-weight", "1", "--kl-per-batch"]).kl_per_batch
    plain = bm.parse_args([])
    assert not plain.kl_per_batch and plain.init == "torch" and plain.rule == "quantiles"


def test_article_run_writes_every_output_with_the_setting_recorded(data_dir, tmp_path):
    out = tmp_path / "out"
    m = bm.main(["--article", "--data-dir", str(data_dir), "--out-dir", str(out), "--hidden-size", "16",
                 "--epochs", "1", "--unc-samples", "10", "--ood", "noise", "--noise-count", "50"])
    assert sorted(p.name for p in out.iterdir()) == sorted(bm.OUTPUTS)
    assert m["rule"] == {"max_median_prob": 0.2} and m["average"] == "logits" and m["threshold"] is None
    refused = m["abstention"]["noise"]["refused"]
    assert 0 <= refused <= 1 and 0 <= m["abstention"]["MNIST"]["refused"] <= 1
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["settings"]
    assert saved["kl_per_batch"] and saved["init"] == "article" and saved["val_size"] == 0 and saved["lr"] == 0.01
    assert bm.load_guide(out / "guide.pt").rule == {"max_median_prob": 0.2}


def test_a_threshold_beside_the_median_rule_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bm.parse_args(["--article", "--threshold", "0.1"])
    assert capsys.readouterr().err.splitlines()[-1] == ("bnn_mnist.py: error: argument --threshold: the median rule "
                                                       "has its own cut (0.2); --threshold sets the quantile rule's")
    assert e.value.code == 2
    assert bm.parse_args(["--rule", "quantiles", "--threshold", "0.1"]).threshold == 0.1


def test_the_article_answers_with_the_highest_class_median_the_quantile_rule_with_the_mean():
    """One sample sure of class 0, two that give class 1 0.4: the mean says 0, the medians say 1."""
    probs = torch.full((3, 1, 10), 0.6 / 9)
    probs[0, 0] = torch.tensor([0.98] + [0.02 / 9] * 9)
    probs[1:, 0, 1] = 0.4
    assert torch.allclose(probs.sum(-1), torch.ones(3, 1))
    assert bm.rule_classes(probs, bm.article_rule()).tolist() == [1]
    assert bm.rule_classes(probs, {"mutual_information": 0.1}).tolist() == [0]


@pytest.mark.parametrize("average", ["logits", "probs"])
def test_the_runs_figure_draws_the_articles_bars_or_the_samples(average, monkeypatch, tmp_path):
    """prediction.png: under the article's averaging, one bar set, the softmax of the min-max
    normalised mean logits (what its notebook drew); else each sample's probabilities."""
    net = bm.BNN(784, H, 10, init_scale=0.3)
    net.trained.fill_(True)
    x, y = torch.rand(5, 784), torch.randint(0, 10, (5,))
    logits = torch.tensor([[4.0, 0.0, 1.0] + [0.0] * 7, [2.0, 2.0, -1.0] + [0.0] * 7])  # (S=2, 10) for x[:1]
    sample_logits = bm.sample_logits
    monkeypatch.setattr(bm, "sample_logits", lambda x, net, s: logits[:, None] if len(x) == 1 else sample_logits(x, net, s))
    drawn = {}
    monkeypatch.setattr(bm, "plot", lambda image, bars, label=None, path=None: drawn.update(image=image, bars=bars,
                                                                                            label=label))
    cfg = bm.Config(average=average, num_samples=2)
    pyro.set_rng_seed(0)
    m = bm.forced_prediction(cfg, net, x, y, {"losses": [1.0], "train_seconds": 0.0}, torch.device("cpu"), tmp_path)
    pyro.set_rng_seed(0)
    assert m["test_nll"] == bm.evaluate(bm.predict_prob(x, net, 2, average), y)["nll"]  # its numbers so averaged too
    assert drawn["label"] == y[0] and torch.equal(drawn["image"], x[0])  # the first test digit, with its label
    mean = torch.tensor([3.0, 1.0, 0.0] + [0.0] * 7)  # min 0, max 3
    expected = (mean / 3).softmax(-1) if average == "logits" else logits.softmax(-1)
    assert torch.allclose(drawn["bars"], expected)


@pytest.mark.parametrize("num_samples", [1, 2, 3, 4, 5, 100, 101])
def test_the_median_is_numpys_percentile_50_for_odd_and_even_sample_counts(num_samples):
    """The article took each class's median with NumPy's percentile(50): the middle sample when S is
    odd, the mean of the two middle ones when it is even."""
    import numpy as np

    probs = torch.rand(num_samples, 6, 10, generator=torch.Generator().manual_seed(num_samples)).softmax(-1)
    expected = torch.from_numpy(np.percentile(probs.numpy(), 50, axis=0)).float()
    assert torch.allclose(bm.median_probs(probs), expected, atol=1e-7)
    assert torch.allclose(bm.max_median_prob(probs), expected.max(-1).values, atol=1e-7)


def test_train_takes_the_articles_loss_when_asked(small_data):
    """train(kl_per_batch=True): each step's loss is the minibatch NLL, not scaled to the data set, plus
    the whole KL; on the same draws it is lower than the default's by the scaling of the NLL."""
    x, y, _, _ = small_data
    losses = {}
    for kl_per_batch in (False, True):
        pyro.set_rng_seed(0)
        net = bm.BNN(784, H, 10)
        losses[kl_per_batch] = bm.train(net, x, y, epochs=1, max_batches=1, kl_per_batch=kl_per_batch, progress=False,
                                        log=lambda *a: None)["losses"][0]
    assert losses[True] < losses[False]


def test_the_minibatch_sits_in_a_plate_named_data_of_the_data_sets_size():
    """What poutine.trace shows a Pyro user: a subsample plate "data" of size N holding the B images."""
    net = bm.BNN(784, H, 10)
    trace = pyro.poutine.trace(bm.model).get_trace(torch.rand(5, 784), torch.randint(0, 10, (5,)), 1000, net=net)
    plate = trace.nodes["data"]
    assert site_is_subsample(plate) and plate["fn"].size == 1000 and len(plate["value"]) == 5
    assert trace.nodes["obs"]["cond_indep_stack"][0].name == "data"
