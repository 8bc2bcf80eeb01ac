"""Tests written to catch deliberate one-line bugs (mutation testing, see docs/contributing/testing.md).

Each names the bug it catches; tests/mutate.py applies those bugs and more.
"""

import math

import pyro
import pytest
import torch

import bnn_mnist as bm
from conftest import TINY, ready_net


class RecordingSVI:
    """Stands in for SVI: records every step's arguments, returns a fixed loss."""

    def __init__(self, loss=600.0):
        self.calls, self.loss = [], loss

    def step(self, *args):
        self.calls.append(args)
        return self.loss


def fresh_state():
    return {"epoch": 0, "step": 0, "perm": None, "loss_sum": 0.0, "losses": [], "train_seconds": 0.0}


def test_train_epoch_sees_every_image_once_and_scales_to_the_data_set():
    # bugs: svi.step without num_data (the article's KL counted per batch), the last partial
    # batch dropped, batches overlapping, the loss divided by the batch size instead of N
    x, y = torch.rand(600, 784), torch.arange(600)
    svi = RecordingSVI(loss=1200.0)
    loss = bm.train_epoch(svi, x, y, 128, fresh_state(), steps=math.ceil(600 / 128))
    assert [len(c[0]) for c in svi.calls] == [128, 128, 128, 128, 88]
    assert all(len(c) == 3 and c[2] == 600 for c in svi.calls)  # num_data: the whole training set
    seen = torch.cat([c[1] for c in svi.calls])
    assert torch.equal(seen.sort().values, torch.arange(600))
    assert not torch.equal(seen, torch.arange(600))  # shuffled
    assert loss == pytest.approx(1200.0 / 600)  # the -ELBO per training image


def test_train_epoch_resumes_mid_epoch_with_the_same_shuffle():
    x, y = torch.rand(100, 784), torch.arange(100)
    state = fresh_state()
    state["perm"], state["step"] = torch.arange(100).flip(0), 3
    svi = RecordingSVI()
    bm.train_epoch(svi, x, y, 10, state, steps=10)
    assert len(svi.calls) == 7 and torch.equal(svi.calls[0][1], torch.arange(69, 59, -1))
    assert state["step"] == 10


def test_predict_is_the_argmax_of_the_many_sample_average():
    # bug: predict (or predict_prob) drawing one sample instead of num_samples
    net = ready_net(16, init_scale=2.0)  # a posterior whose samples disagree a lot
    x = torch.rand(300, 784)
    pyro.set_rng_seed(0)
    labels = bm.predict(x, net, 200)
    pyro.set_rng_seed(0)
    assert torch.equal(labels, bm.predict_prob(x, net, 200).argmax(-1))
    pyro.set_rng_seed(0)
    assert (bm.predict(x, net, 1) != labels).float().mean() > 0.1
    pyro.set_rng_seed(0)
    assert (bm.predict_prob(x, net) - bm.predict_prob(x, net, 1)).abs().max() > 0.1  # default: 10


def test_max_prob_is_high_when_unsure_and_zero_when_certain():
    certain = torch.eye(10)[[2]][None].expand(5, 1, 10)  # 5 samples, all sure of class 2
    u = bm.uncertainty(certain)
    assert u["max_prob"].item() == pytest.approx(0, abs=1e-6)
    assert u["predictive_entropy"].item() == pytest.approx(0, abs=1e-5)
    uniform = torch.full((5, 1, 10), 0.1)
    u = bm.uncertainty(uniform)
    assert u["max_prob"].item() == pytest.approx(0.9)
    assert u["expected_entropy"].item() == pytest.approx(math.log(10))


def test_calibration_bins_edges():
    # bug: an off-by-one in the bin index
    conf = torch.tensor([0.12, 0.5, 0.99, 1.0, 0.2, 0.4])
    probs = conf[:, None] * torch.eye(10)[0] + ((1 - conf) / 9)[:, None] * (1 - torch.eye(10)[0])
    count, mean_conf, acc = bm.calibration_bins(probs, torch.zeros(6, dtype=torch.long), bins=15)
    expected = torch.zeros(15)
    for b in (1, 7, 14, 14, 3, 6):  # floor(conf * 15), the top bin closed at 1.0
        expected[b] += 1
    assert torch.equal(count, expected)
    assert mean_conf[14].item() == pytest.approx(0.995) and acc[14].item() == 1.0


def test_brier_score_sums_over_classes():
    # bug: the Brier score averaged over classes (10x too small)
    uniform = torch.full((4, 10), 0.1)
    assert bm.evaluate(uniform, torch.zeros(4, dtype=torch.long))["brier"] == pytest.approx(0.9)
    assert bm.evaluate(torch.eye(10)[[3, 4]], torch.tensor([3, 4]))["brier"] == 0


def test_a_non_finite_posterior_is_never_saved(tmp_path):
    # bug: the finite-parameter check before saving removed
    net = ready_net(8)
    svi, optim = bm.make_svi(net, lr=0.01)
    path = tmp_path / "checkpoint.pt"
    run = bm.TrainingRun(net, optim, steps=3, epochs=1, progress=False, log=print, checkpoint_path=path)
    with pyro.get_param_store().scope():
        run.start()
        run.save("fine")
        good = path.read_bytes()
        net.rho["out_bias"].data[0] = float("inf")
        with pytest.raises(bm.Error, match="non-finite"):
            run.save("end of epoch 1")
    assert path.read_bytes() == good


def test_the_scale_lr_factor_applies_to_scales_only_and_every_rate_decays():
    # bugs: the factor applied to the means; no learning-rate decay
    net = bm.BNN(784, 8, 10)
    svi, optim = bm.make_svi(net, lr=0.01, lr_decay=0.5, scale_lr_factor=5.0)
    x, y = torch.rand(4, 784), torch.arange(4)
    with pyro.get_param_store().scope():
        svi.step(x, y, 100)
        svi.step(x, y, 100)
        lrs = {pyro.get_param_store().param_name(p): o.param_groups[0]["lr"] for p, o in optim.optim_objs.items()}
    # ClippedAdam multiplies the rate by lr_decay at each step: two steps, 0.5 ** 2
    expected = {f"bnn$$${kind}.{k}": base / 4 for kind, base in (("loc", 0.01), ("rho", 0.05)) for k in net.loc}
    assert len(expected) == 8 and lrs == pytest.approx(expected)




def test_the_cli_uses_the_sample_counts_it_is_given(tmp_path, data_dir, monkeypatch, capsys):
    # bugs: --num-samples or --unc-samples ignored
    calls = []

    def spy(real):
        def draw(x, net, num_samples=bm.DEFAULTS.num_samples, **kw):
            calls.append((len(x), num_samples))
            return real(x, net, num_samples, **kw)
        return draw

    monkeypatch.setattr(bm, "sample_logits", spy(bm.sample_logits))  # the forced prediction
    monkeypatch.setattr(bm, "sample_probs_local", spy(bm.sample_probs_local))  # the rule and the report
    m = bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", *TINY,
                 "--num-samples", "7", "--unc-samples", "13"])
    # the forced prediction on the 200 test digits; the held-out 100; then every set in one pass
    # (200 test digits, 50 noise, 4 near-OOD and 5 more rotations of the 200 test digits)
    assert (200, 7) in calls and (100, 13) in calls and (200 + 50 + 9 * 200, 13) in calls, calls
    assert m["num_samples"] == 7 and m["unc_samples"] == 13


@pytest.mark.parametrize("flag, value", [
    ("--lr", "0.02"), ("--lr-decay", "0.9"), ("--batch-size", "32"), ("--scale-lr-factor", "2"),
    ("--init-scale", "0.01"), ("--elbo", "meanfield"), ("--seed", "3"), ("--max-batches", "2"),
    ("--train-subset", "300"), ("--val-size", "50"), ("--prior-scale", "0.5"), ("--hidden-size", "24"),
    ("--kl-weight", "0.5"),
])
def test_resume_refuses_every_training_setting_changed(tmp_path_factory, data_dir, capsys, flag, value):
    # bug: the resume settings check narrowed to a few settings
    out = tmp_path_factory.mktemp("resume")
    argv = ["--data-dir", str(data_dir), "--out-dir", str(out), "--epochs", "1", *TINY]
    bm.main(argv)
    with pytest.raises(SystemExit) as e:
        bm.main([*argv, "--epochs", "2", "--resume", flag, value])
    err = capsys.readouterr().err
    setting = flag[2:].replace("-", "_")
    named = "different --hidden-size" if setting == "hidden_size" else f"other settings ({setting} "
    assert e.value.code == 1 and named in err, err


def test_model_priors_and_guide_scales_are_what_they_say():
    # bugs: the prior scale ignored; the guide's scale not softplus(rho); the plate's size
    net = bm.BNN(784, 8, 10, init_scale=0.3)
    x, y = torch.rand(5, 784), torch.arange(5)
    with pyro.get_param_store().scope():
        model_trace = pyro.poutine.trace(bm.model).get_trace(x, y, 1000, net=net, prior_scale=0.25)
        guide_trace = pyro.poutine.trace(bm.guide).get_trace(net=net)
    for name in net.loc:
        prior = model_trace.nodes[name]["fn"].base_dist  # Independent(Normal)
        assert torch.all(prior.scale == 0.25) and torch.all(prior.loc == 0)
        q = guide_trace.nodes[name]["fn"].base_dist
        assert torch.allclose(q.scale, torch.nn.functional.softplus(net.rho[name])) and q.loc is net.loc[name]
    assert model_trace.nodes["obs"]["scale"] == pytest.approx(1000 / 5)


def test_a_score_equal_to_the_threshold_is_accepted_and_any_measure_refuses():
    u = {"mutual_information": torch.tensor([0.1, 0.2, 0.3, 0.0]), "expected_entropy": torch.tensor([0, 0, 0, 2.0])}
    refused = bm.refuses(u, {"mutual_information": 0.2, "expected_entropy": 1.0})
    assert refused.tolist() == [False, False, True, True]
    assert bm.refuses(u, {"mutual_information": 0.2}).tolist() == [False, False, True, False]
    a = bm.abstention(refused, torch.tensor([True, False, True, True]))
    assert a["coverage"] == 0.5 and a["accuracy_accepted"] == 0.5


def test_held_out_images_are_never_trained_on_and_the_same_for_every_seed(data_dir):
    cfg = bm.Config(data_dir=str(data_dir), val_size=100)
    x, _, xv, _, _, _ = bm.split_data(cfg, torch.device("cpu"))
    assert len(x) == 500 and len(xv) == 100
    rows = {tuple(r.tolist()) for r in x}
    assert not any(tuple(r.tolist()) in rows for r in xv)
    _, _, xv2, _, _, _ = bm.split_data(bm.Config(data_dir=str(data_dir), val_size=100, seed=5), torch.device("cpu"))
    assert torch.equal(xv, xv2)
    x3, _, _, _, _, _ = bm.split_data(bm.Config(data_dir=str(data_dir), val_size=100, train_subset=50),
                                      torch.device("cpu"))
    assert torch.equal(x3, x[:50])


def test_a_given_threshold_is_used_and_stored(tmp_path, data_dir, capsys):
    m = bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", *TINY,
                 "--threshold", "0.5", "--ambiguity-quantile", "0"])
    assert m["threshold"] == 0.5 and bm.load_guide(tmp_path / "guide.pt").rule == {"mutual_information": 0.5}
    assert m["abstention"]["MNIST"]["refused"] == 0.0  # nothing on these digits is that unsure
    m = bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", *TINY,
                 "--refuse-quantile", "0.5", "--ambiguity-quantile", "0"])
    assert 0.25 <= m["abstention"]["MNIST"]["refused"] <= 0.8  # about half: the held-out median


def test_train_takes_every_batch_and_decays_per_epoch(small_data, monkeypatch):
    # bugs: the last partial batch dropped (steps = N // B); --max-batches ignored; the epoch's
    # decay applied at every step
    x, y, _, _ = small_data  # 600 images: 4 full batches of 128 and one of 88
    seen = {}
    real_epoch, real_svi = bm.train_epoch, bm.make_svi

    def spy_epoch(svi, x_train, y_train, batch_size, state, steps, *args):
        seen.setdefault("steps", []).append(steps)
        loss = real_epoch(svi, x_train, y_train, batch_size, state, steps, *args)
        seen.setdefault("perms", []).append(state["perm"].clone())
        return loss

    def spy_svi(net, lr, lr_decay=1.0, *args):
        seen["lr_decay"] = lr_decay
        return real_svi(net, lr, lr_decay, *args)

    monkeypatch.setattr(bm, "train_epoch", spy_epoch)
    monkeypatch.setattr(bm, "make_svi", spy_svi)
    bm.train(bm.BNN(784, 8, 10), x, y, epochs=2, batch_size=128, lr_decay=0.5, progress=False, log=lambda *a: None)
    assert seen["steps"] == [5, 5] and seen["lr_decay"] == pytest.approx(0.5 ** (1 / 5))
    assert not torch.equal(*seen["perms"])  # every epoch reshuffles
    seen.clear()
    bm.train(bm.BNN(784, 8, 10), x, y, epochs=1, batch_size=128, max_batches=2, progress=False, log=lambda *a: None)
    assert seen["steps"] == [2]


def test_each_elbo_name_is_its_estimator():
    from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

    net = bm.BNN(784, 8, 10)
    local = bm.make_svi(net, lr=0.01, elbo="local")[0].loss  # a loss callable: SVI keeps it as given
    assert local.func is bm.local_reparam_loss and bm.DEFAULTS.elbo == "trace"
    assert local.keywords == {"net": net, "prior_scale": None, "kl_weight": bm.DEFAULTS.kl_weight}
    # an ELBO object: SVI keeps its bound methods
    assert type(bm.make_svi(net, lr=0.01)[0].loss.__self__) is Trace_ELBO
    assert type(bm.make_svi(net, lr=0.01, elbo="meanfield")[0].loss.__self__) is TraceMeanField_ELBO


def test_bnn_forward_is_the_relu_network_for_one_or_many_weight_sets():
    # bug: the ReLU dropped (a linear model still learns the separable test digits)
    w = {"fc1_weight": torch.tensor([[1.0, 0.0], [0.0, -1.0], [1.0, 1.0]]), "fc1_bias": torch.tensor([0.0, 0.0, -10.0]),
         "out_weight": torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 0.0]]), "out_bias": torch.tensor([0.5, 0.0])}
    x = torch.tensor([[2.0, 3.0], [-1.0, -4.0]])
    expected = torch.tensor([[2.5, 0.0], [4.5, 8.0]])  # hidden (2, 0, 0) and (0, 4, 0)
    assert torch.equal(bm.bnn_forward(w, x), expected)
    many = {k: torch.stack([v, 2 * v]) for k, v in w.items()}  # two weight sets at once: (2, B, C)
    assert torch.equal(bm.bnn_forward(many, x)[0], expected)


def test_predict_or_abstain_uses_the_rule_given_else_the_nets_own():
    net = ready_net(8, init_scale=0.1)
    x = torch.rand(6, 784)
    with pytest.raises(ValueError, match="no refusal rule"):
        bm.predict_or_abstain(x, net)
    net.rule = {"mutual_information": 10.0}  # as load_guide sets it: never refuses
    assert (bm.predict_or_abstain(x, net, num_samples=5) >= 0).all()
    assert (bm.predict_or_abstain(x, net, {"mutual_information": -1.0}, num_samples=5) == -1).all()


def test_every_set_is_refused_by_the_whole_rule(tmp_path, data_dir, monkeypatch, capsys):
    # bug: the out-of-distribution sets refused by the primary measure alone
    seen = []
    real = bm.refuses

    def spy(u, rule):
        seen.append((len(u["mutual_information"]), tuple(rule)))
        return real(u, rule)

    monkeypatch.setattr(bm, "refuses", spy)
    m = bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", *TINY])
    both = ("mutual_information", "expected_entropy")
    assert (200, both) in seen and (50, both) in seen  # MNIST test and the 50 noise images
    assert tuple(m["rule"]) == both


def test_the_mutmut_tools_set_aside_rule_compares_defaults_and_leaves_out_only_help_text():
    """tests/mutmut_parts.py keeps a survivor out of the score as "help text" only when nothing but
    help= differs: a changed default argument (a port, a bin count) is behaviour."""
    import mutmut_parts

    source = ('\ndef x_f__mutmut_orig(a, port=8000):\n    parser.add_argument("--a", type=int, help="words")\n\n'
              'def x_f__mutmut_1(a, port=8001):\n    parser.add_argument("--a", type=int, help="words")\n\n'
              'def x_f__mutmut_2(a, port=8000):\n    parser.add_argument("--a", type=int, help="XXwordsXX")\n\n'
              'def x_f__mutmut_3(a, port=8000):\n    parser.add_argument("--a", type=float, help="words")\n')
    assert [mutmut_parts.not_behaviour(f"bnn_mnist.x_f__mutmut_{i}", source) for i in (1, 2, 3)] == \
        [None, "help text", None]
