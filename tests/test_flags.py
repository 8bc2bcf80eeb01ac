"""Every flag that changes the science, end to end through `bm.main([...])`, against numbers
recomputed independently (numpy, counting pairs) from the posterior samples the run drew.

A spy records each `sample_probs` call of a run (its images, sample count, the RNG state
before it, and its (S, B, 10) answer); every number in metrics.json and on stdout is then
recomputed from those samples here, without the module's metric functions, and the saved
guide must reproduce the samples. The runs are tiny (about a second each) and shared by
the tests of this file.
"""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

import bnn_mnist as bm
from conftest import TINY, make_mnist_dir, ready_net, synthetic_digits

EPS = 1e-12


# -----------------------------------------------------------------------------
# Independent references (numpy)


def measures(probs):
    """The four measures of (S, B, 10) sample probabilities, by their textbook definitions, in
    the samples' own float32 (mutual information is a small difference of two entropies)."""
    mean = probs.mean(0)
    h = lambda q: -(q * q.clamp_min(EPS).log()).sum(-1)  # noqa: E731
    pe, ee = h(mean), h(probs).mean(0)
    u = {"predictive_entropy": pe, "expected_entropy": ee, "mutual_information": (pe - ee).clamp_min(0),
         "max_prob": 1 - mean.max(-1).values}
    return {k: v.double().numpy() for k, v in u.items()}


def auroc_by_pairs(score_in, score_out):
    """P(out > in) + P(out == in) / 2 over every (in, out) pair."""
    a, b = np.asarray(score_in)[:, None], np.asarray(score_out)[None, :]
    return float(((b > a) + 0.5 * (b == a)).mean())


def ece_by_hand(probs, y, bins=15):
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (conf >= lo) & ((conf < hi) if b < bins - 1 else (conf <= hi))
        if inside.any():
            total += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return total


def scores_of(probs, y):
    p, y = probs.double().numpy(), y.numpy()
    p_true = p[np.arange(len(y)), y]
    return {"accuracy": float((p.argmax(1) == y).mean()), "nll": float(-np.log(np.clip(p_true, EPS, None)).mean()),
            "brier": float(((p - np.eye(10)[y]) ** 2).sum(1).mean()), "ece": ece_by_hand(p, y)}


def refused_by(u, rule):
    return np.any([u[m] > t for m, t in rule.items()], axis=0)


# -----------------------------------------------------------------------------
# Runs


class Run:
    def __init__(self, metrics, out, stdout, calls, svi_args, epochs_seen):
        self.m, self.out, self.stdout, self.calls = metrics, out, stdout, calls
        self.svi_args, self.epochs_seen = svi_args, epochs_seen

    def probs(self, target, which=0):
        """The `which`-th recorded sample_probs call whose images hold `target` (n, 784) as a
        block, as {"x", "S", "rng", "probs"} of that block (sets may be scored in one call)."""
        found = []
        for c in self.calls:
            x, n = c["x"], len(target)
            for o in (c["x"][:, :1] == target[0, :1]).nonzero()[:, 0].tolist():
                if o + n <= len(x) and torch.equal(x[o : o + n], target):
                    found.append({**c, "x": x[o : o + n], "probs": c["probs"][:, o : o + n], "whole": c})
                    break
        return found[which]


@pytest.fixture(scope="module")
def cli(data_dir, tmp_path_factory):
    cache = {}

    def run(*flags):
        if flags in cache:
            return cache[flags]
        out = tmp_path_factory.mktemp("flags")
        calls, svi_args, epochs_seen = [], [], []
        real_svi, real_epoch = bm.make_svi, bm.train_epoch

        def spy_sample(real, logits=False):  # the forced prediction's logits, the uncertainty's local samples
            def spy(x, net, num_samples=bm.DEFAULTS.num_samples, **kw):
                rng = torch.get_rng_state()
                out = real(x, net, num_samples, **kw)
                probs = out.softmax(-1) if logits else out
                calls.append({"n": len(x), "x": x.clone(), "S": num_samples, "rng": rng, "probs": probs.clone()})
                return out
            return spy

        def spy_svi(net, *args, **kwargs):
            svi_args.append({"scales": {k: float(torch.nn.functional.softplus(r.detach()).mean()) for k, r in net.rho.items()},
                             "args": args, "kwargs": kwargs})
            return real_svi(net, *args, **kwargs)

        def spy_epoch(svi, x_train, y_train, batch_size, state, steps, *args):
            epochs_seen.append({"n": len(x_train), "batch_size": batch_size, "steps": steps})
            return real_epoch(svi, x_train, y_train, batch_size, state, steps, *args)

        stdout = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
            mp.setattr(bm, "sample_logits", spy_sample(bm.sample_logits, logits=True))
            mp.setattr(bm, "sample_probs_local", spy_sample(bm.sample_probs_local))
            mp.setattr(bm, "make_svi", spy_svi)
            mp.setattr(bm, "train_epoch", spy_epoch)
            metrics = bm.main(["--data-dir", str(data_dir), "--out-dir", str(out), "--epochs", "1", *TINY, *flags])
        cache[flags] = Run(metrics, out, stdout.getvalue(), calls, svi_args, epochs_seen)
        return cache[flags]

    return run


# the synthetic test digits and labels, made independently of the module's loader
X_TEST = torch.from_numpy(synthetic_digits(200, 1)[0]).reshape(200, 784).float() / 255
Y_TEST = torch.from_numpy(synthetic_digits(200, 1)[1]).long()
X_TRAIN = torch.from_numpy(synthetic_digits(600, 0)[0]).reshape(600, 784).float() / 255


def held_out(val):
    """The held-out images: a fixed draw (seed 1234) of val training images."""
    return X_TRAIN[torch.randperm(600, generator=torch.Generator().manual_seed(1234))[:val]]


def noise_set(seed, n):
    return torch.rand(n, 784, generator=torch.Generator().manual_seed(seed + 1))


def check_report(run, measure="mutual_information", quantile=0.98, ambiguity=0.965, threshold=None, val=100,
                 noise=50, unc=10, num_samples=10):
    """Every number of a run's report recomputed from the samples it drew."""
    m = run.m
    val_call = run.probs(held_out(val))
    u_val = measures(val_call["probs"])
    assert val_call["S"] == unc and len(val_call["whole"]["x"]) == val  # the held-out images alone
    rule = {measure: float(np.quantile(u_val[measure], quantile))}
    if ambiguity and measure != "expected_entropy":
        rule["expected_entropy"] = float(np.quantile(u_val["expected_entropy"], ambiguity))
    if threshold is not None:
        rule[measure] = threshold
    assert m["rule"] == pytest.approx(rule, rel=1e-9, abs=1e-12) and list(m["rule"]) == list(rule)
    assert m["threshold"] == m["rule"][measure] and m["measure"] == measure
    # the forced prediction: num_samples samples of every test image
    forced, unc_test = run.probs(X_TEST, 0), run.probs(X_TEST, 1)
    assert forced["S"] == num_samples and unc_test["S"] == unc
    f = scores_of(forced["probs"].mean(0), Y_TEST)
    assert m["test_accuracy"] == pytest.approx(f["accuracy"]) and m["test_nll"] == pytest.approx(f["nll"], rel=1e-5)
    assert m["test_ece"] == pytest.approx(f["ece"], rel=1e-5, abs=1e-7)
    assert f"test accuracy {f['accuracy']:.4f}  NLL {f['nll']:.4f}  ECE {f['ece']:.4f}  ({num_samples} samples' " \
           f"probs averaged" in run.stdout
    # calibration and abstention on the unc_samples samples
    c = scores_of(unc_test["probs"].mean(0), Y_TEST)
    assert m["calibration"] == pytest.approx(c, rel=1e-5, abs=1e-7)
    assert f"calibration: NLL {c['nll']:.4f}  Brier {c['brier']:.4f}  ECE {c['ece']:.4f} ({unc} samples)" in run.stdout
    u_test = measures(unc_test["probs"])
    refused = refused_by(u_test, m["rule"])
    correct = unc_test["probs"].mean(0).argmax(1).numpy() == Y_TEST.numpy()
    a = m["abstention"]["MNIST"]
    assert a["refused"] == pytest.approx(refused.mean()) and a["coverage"] == pytest.approx(1 - refused.mean())
    assert a["accuracy_accepted"] == pytest.approx(correct[~refused].mean())
    when = " or ".join(f"{k} > {t:.4g}" for k, t in m["rule"].items())
    assert f"refusing when {when}: MNIST refused {refused.mean():.1%}, {correct[~refused].mean():.2%} right" in run.stdout
    article = np.quantile(u_test[measure], 0.875)  # the article's operating point: 12.5% of MNIST refused
    if noise:
        p = run.probs(noise_set(m["seed"], noise))  # exactly the noise set: uniform images from seed + 1
        assert p["S"] == unc
        u_noise = measures(p["probs"])
        assert m["abstention"]["noise"] == {"refused": pytest.approx(refused_by(u_noise, m["rule"]).mean())}
        expected_auroc = {k: auroc_by_pairs(u_test[k], u_noise[k]) for k in bm.MEASURES}
        assert m["auroc"]["noise"] == pytest.approx(expected_auroc, abs=1e-9)
        op = m["at_article_operating_point"]
        assert op["MNIST"] == 0.125 and op["noise"] == pytest.approx((u_noise[measure] > article).mean())
        assert f"AUROC MNIST vs noise: {measure} {expected_auroc[measure]:.4f}" in run.stdout
        (line,) = [t for t in run.stdout.splitlines() if t.startswith("refusing 12.5% of MNIST test as the article did: ")]
        assert f"noise refused {(u_noise[measure] > article).mean():.1%}" in line
    else:
        assert "noise" not in m["auroc"] and set(m["abstention"]) == {"MNIST"}
        assert m["at_article_operating_point"] == {"MNIST": 0.125}
        assert "AUROC MNIST vs noise" not in run.stdout and "as the article did" not in run.stdout
        with pytest.raises(IndexError):  # no noise images scored
            run.probs(noise_set(m["seed"], 50))
    # the saved guide is the posterior that drew these samples, and holds the rule
    net = bm.load_guide(run.out / "guide.pt")
    assert net.rule == m["rule"]
    torch.set_rng_state(unc_test["rng"])
    assert torch.equal(bm.sample_probs_local(unc_test["whole"]["x"], net, unc), unc_test["whole"]["probs"])
    assert json.loads((run.out / "metrics.json").read_text()) == json.loads(json.dumps(m))  # the file says the same


# -----------------------------------------------------------------------------
# The default run and each flag


def test_default_run_reports_what_its_labels_say(cli):
    run = cli()
    check_report(run)
    m = run.m
    assert m["epochs"] == 1 and len(m["epoch_losses"]) == 1 and m["num_samples"] == 10 and m["unc_samples"] == 10
    assert m["seed"] == 0 and m["device"] == "cpu" and m["ood_skipped"] == {}
    assert "data: 500 training, 100 held-out, 200 test images" in run.stdout
    assert f"epoch 1/1  loss {m['epoch_losses'][0]:.4f} per example" in run.stdout
    # orderings that must hold: uniform noise is more uncertain than the digits
    assert m["auroc"]["noise"]["mutual_information"] > 0.9 and m["auroc"]["noise"]["predictive_entropy"] > 0.9
    assert m["abstention"]["noise"]["refused"] > m["abstention"]["MNIST"]["refused"]
    assert m["test_accuracy"] > 0.8


def test_max_prob_at_the_median_without_the_ambiguity_half_refuses_about_half(cli):
    run = cli("--measure", "max_prob", "--refuse-quantile", "0.5", "--ambiguity-quantile", "0")
    check_report(run, "max_prob", quantile=0.5, ambiguity=0)
    assert list(run.m["rule"]) == ["max_prob"]
    u_val = measures(run.probs(held_out(100))["probs"])
    assert refused_by(u_val, run.m["rule"]).mean() == pytest.approx(0.5, abs=0.011)  # half the held-out images
    assert 0.3 <= run.m["abstention"]["MNIST"]["refused"] <= 0.7  # about half the same-distribution test digits
    assert run.m["auroc"]["noise"]["max_prob"] > 0.9


def test_expected_entropy_measure_is_the_whole_rule_at_the_refuse_quantile(cli):
    run = cli("--measure", "expected_entropy", "--refuse-quantile", "0.9")
    check_report(run, "expected_entropy", quantile=0.9)
    assert list(run.m["rule"]) == ["expected_entropy"]  # the ambiguity half would be the same test
    u_val = measures(run.probs(held_out(100))["probs"])
    assert refused_by(u_val, run.m["rule"]).mean() == pytest.approx(0.1, abs=0.011)  # 10% of the held-out


def test_default_rule_refuses_a_few_percent_of_held_out_digits(cli):
    # the default 100 samples: every image of a call shares the same weight sets, so with TINY's 10
    # one unlucky draw shifts a whole set's mutual information (test digits refused 20-30% here)
    run = cli("--unc-samples", "100")
    u_val = measures(run.probs(held_out(100))["probs"])
    # above the 98% quantile of one measure or the 96.5% quantile of another: 2% to 5.5%
    assert 0.02 - 0.011 <= refused_by(u_val, run.m["rule"]).mean() <= 0.055 + 0.011
    assert run.m["abstention"]["MNIST"]["refused"] <= 0.15


def test_a_given_threshold_is_the_rule_and_the_seed_and_noise_count_make_the_noise(cli):
    run = cli("--measure", "predictive_entropy", "--threshold", "1.0", "--seed", "5", "--noise-count", "30")
    check_report(run, "predictive_entropy", threshold=1.0, noise=30)
    assert run.m["rule"]["predictive_entropy"] == 1.0 and run.m["seed"] == 5
    assert run.m["epoch_losses"] != cli().m["epoch_losses"]  # another seed, another run
    assert run.m["auroc"]["noise"]["predictive_entropy"] > 0.9


def test_num_samples_changes_only_the_forced_prediction(cli):
    base, run = cli(), cli("--num-samples", "3")
    check_report(run, num_samples=3)
    assert run.m["num_samples"] == 3 and run.m["rule"] == base.m["rule"]  # the same training and held-out draw
    a, b = torch.load(base.out / "guide.pt", weights_only=True), torch.load(run.out / "guide.pt", weights_only=True)
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert run.m["test_nll"] != base.m["test_nll"]  # 3 samples instead of 10


def test_kl_weight_one_weighs_the_kl_more(cli):
    base, heavy = cli(), cli("--kl-weight", "1")
    assert heavy.svi_args[0]["args"][-1] == 1.0 and base.svi_args[0]["args"][-1] == bm.DEFAULTS.kl_weight
    # the same seed and data: the -ELBO per example grows by the extra KL (thousands of nats / 500 images)
    assert heavy.m["epoch_losses"][0] > base.m["epoch_losses"][0] + 1


def test_training_flags_reach_the_optimiser_and_the_saved_guide(cli):
    run = cli("--lr", "0.02", "--lr-decay", "0.3", "--scale-lr-factor", "3", "--prior-scale", "0.5",
              "--kl-weight", "0.5", "--elbo", "meanfield", "--init-scale", "0.01", "--batch-size", "32",
              "--max-batches", "5", "--train-subset", "300", "--val-size", "50", "--hidden-size", "12",
              "--epochs", "2", "--unc-samples", "6", "--ood", "none")
    (call,) = run.svi_args
    assert bm.DEFAULTS.elbo == "trace" and cli().svi_args[0]["args"][3] == "trace"
    net_args = (0.02, pytest.approx(0.3 ** (1 / 5)), 0.5, "meanfield", 3.0, 0.5)  # lr, per-step decay, ...
    assert call["args"] == net_args and call["kwargs"] == {}
    assert call["scales"] == pytest.approx(dict.fromkeys(call["scales"], 0.01))  # --init-scale
    assert run.epochs_seen == [{"n": 300, "batch_size": 32, "steps": 5}] * 2
    assert "data: 300 training, 50 held-out, 200 test images" in run.stdout
    assert run.m["epochs"] == 2 and len(run.m["epoch_losses"]) == 2 and run.m["unc_samples"] == 6
    check_report(run, val=50, noise=0, unc=6)
    net = bm.load_guide(run.out / "guide.pt")
    assert net.prior_scale == 0.5 and net.sizes == (784, 12, 10)


def test_the_articles_operating_point_refuses_an_eighth_of_same_distribution_digits(cli, tmp_path_factory):
    """The stand-in "Fashion-MNIST" here is 100 more synthetic digits: above the 87.5% quantile
    of the test digits' measure lie about an eighth of them (the wrong tail: seven eighths)."""
    fashion = make_mnist_dir(tmp_path_factory.mktemp("fashion"), n_train=10, n_test=100, dataset="FashionMNIST")
    run = cli("--ood", "fashion,noise", "--fashion-dir", str(fashion / "FashionMNIST/raw"))
    check_report(run)
    digits = torch.from_numpy(synthetic_digits(100, 1)[0]).reshape(100, 784).float() / 255
    u_f, u_test = measures(run.probs(digits)["probs"]), measures(run.probs(X_TEST, 1)["probs"])
    article = np.quantile(u_test["mutual_information"], 0.875)
    share = (u_f["mutual_information"] > article).mean()
    assert run.m["at_article_operating_point"]["Fashion-MNIST"] == pytest.approx(share) and 0.02 < share < 0.35
    assert 0.3 < run.m["auroc"]["Fashion-MNIST"]["mutual_information"] < 0.7  # told apart by chance only


def test_a_set_scoring_exactly_at_the_articles_threshold_is_not_refused_by_it(monkeypatch):
    """The article refuses above the 87.5% quantile of MNIST's scores: a score equal to it is kept."""
    same = torch.full((3, 1, 10), 0.1)  # every image of every set: one prediction, so one score
    monkeypatch.setattr(bm, "sample_probs_sets", lambda sets, net, s, sampler: {n: same.expand(3, len(x), 10)
                                                                               for n, x in sets.items()})
    cfg = bm.Config(ood="noise", noise_count=8, shift_size=4, no_plots=True, unc_samples=3)
    x, y = torch.rand(20, 784), torch.randint(0, 10, (20,))
    report = bm.uncertainty_report(cfg, ready_net(8), x, y, {"mutual_information": 0.5}, "cpu", None, torch.rand(784))
    assert report["at_article_operating_point"] == {"MNIST": 0.125, "noise": 0.0}


def test_the_runs_figures_get_the_rules_threshold_and_the_digits_true_labels(monkeypatch, tmp_path):
    """uncertainty_figures hands the histogram the threshold the run refuses at, and the examples
    figure the MNIST digits' labels (OOD images: none, -1)."""
    gen = torch.Generator().manual_seed(0)
    probs = {"MNIST": torch.softmax(torch.randn(5, 10, 10, generator=gen), -1),
             "noise": torch.softmax(torch.randn(5, 4, 10, generator=gen), -1)}  # (S, N, 10)
    rule = {"mutual_information": 0.05, "max_prob": 0.4}
    scores = {n: bm.scores_for(p, rule) for n, p in probs.items()}
    refused = {n: bm.refuses(scores[n], rule) for n in probs}
    y = torch.arange(10)
    seen = {}
    monkeypatch.setattr(bm, "plot_histograms", lambda s, m, threshold, path: seen.update(threshold=threshold))
    monkeypatch.setattr(bm, "plot_examples", lambda x, ps, *a, labels, path: seen.update(labels=labels.tolist(),
                                                                                          n=(len(x), ps.shape[1])))
    cfg = bm.Config(measure="max_prob")
    bm.uncertainty_figures(cfg, torch.rand(10, 784), y, probs, scores, refused, probs["MNIST"].mean(0).argmax(1) == y,
                           {"noise": torch.rand(4, 784)}, rule, tmp_path)
    order = scores["MNIST"]["max_prob"].argsort()
    assert seen["threshold"] == 0.4
    assert seen["labels"] == [*y[order[:3]].tolist(), *y[order[-3:]].tolist(), -1, -1]
    assert seen["n"] == (8, 8)  # each image with its own samples: 6 digits and 2 of each OOD set


def test_the_report_states_the_articles_rule_as_a_floor_and_names_each_ood_set_once(capsys):
    """The median rule refuses at or below its floor; the other measures above their thresholds. MNIST
    is the reference: the OOD lines name the other sets only."""
    report = {
        "abstention": {"MNIST": {"refused": 0.04, "accuracy_accepted": 0.995}, "noise": {"refused": 1.0},
                       "fashion": {"refused": 0.8}},
        "auroc": {"noise": {"mutual_information": 0.99}}, "near_ood_auroc": {}, "control_auroc": {"noise": 0.5},
        "selective": {bm.Config().selective_measure: {"accuracy_kept": 0.99, "aurc": 0.0123}},
        "shift": {0: {"accuracy": 0.98, "ece": 0.01, "nll": 0.05}, 45: {"accuracy": 0.5, "ece": 0.2, "nll": 1.5}},
        "at_article_operating_point": {"MNIST": 0.125, "noise": 1.0, "fashion": 0.8},
    }
    cal = {"nll": 0.06, "brier": 0.03, "ece": 0.002}
    bm.print_report(bm.Config(), report, cal, {"max_median_prob": 0.2, "mutual_information": 0.15})
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == ("refusing when max_median_prob <= 0.2 or mutual_information > 0.15: MNIST refused 4.0%, "
                        "99.50% right on the rest; noise refused 100.0%; fashion refused 80.0%")
    assert lines[-2] == "rotated test digits (degrees: accuracy / ECE / NLL): 0: 98% / 0.010 / 0.05; 45: 50% / 0.200 / 1.50"
    assert lines[-3] == (f"trusting the 95% most certain by {bm.Config().selective_measure}: 99.00% right; "
                         "AURC x 1000 12.30")
    assert lines[-1] == "refusing 12.5% of MNIST test as the article did: noise refused 100.0%; fashion refused 80.0%"
