"""The promises of the docstrings, --help and README, each against a known answer: numbers
worked out by hand, the documented defaults, each flag's accepted and refused values, exit
codes, and the round trips of the refusal rule and the prior."""

import math
import re
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

import bnn_mnist as bm
from conftest import ROOT, TINY, ready_net

H = 8


# -----------------------------------------------------------------------------
# Defaults: written once in Config, read by argparse, shown by --help (README's table)


def test_the_command_line_starts_from_the_config_and_help_shows_each_default(capsys):
    cfg = bm.parse_args([])
    assert cfg == bm.DEFAULTS  # every default is Config's: argparse holds no second copy
    with pytest.raises(SystemExit) as e:
        bm.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    shown = {k: v for k, v in vars(bm.DEFAULTS).items() if v is not None and v is not False}
    for name, value in shown.items():
        flag = f"--{name.replace('_', '-')}"
        assert re.search(rf"{flag} .*?\(default: {re.escape(str(value))}\)", text), flag
    assert "(default: None)" not in text and "(default: False)" not in text  # explained in words instead


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_predict_and_serve_help_show_their_defaults_too(command, capsys):
    with pytest.raises(SystemExit) as e:
        bm.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert re.search(rf"--unc-samples .*?\(default: {bm.DEFAULTS.unc_samples}\)", text)
    assert f"the trained posterior (default: {Path(bm.DEFAULTS.out_dir) / 'guide.pt'})" in text
    assert "(default: None)" not in text and "(default: False)" not in text  # --no-plots explained in words


# the library's keyword arguments that are Config settings under another name
SAME_AS = {"quantile": "refuse_quantile"}
UNC = {"predict_or_abstain", "refusal_rule", "sample_probs_local", "sample_probs_sets", "answer", "predict_files",
       "make_server", "sample_logits_local"}  # their num_samples is the uncertainty passes' (unc_samples)


def test_every_library_default_that_is_a_setting_is_the_configs():
    import ast
    import inspect

    checked = 0
    source = ast.parse((ROOT / "bnn_mnist.py").read_text())
    for name in [n.name for n in source.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]:
        if "__mutmut_" in name:  # under mutation testing the source also holds each mutant's copy
            continue
        f = getattr(bm, name)
        if not inspect.isfunction(f) and not (inspect.isclass(f) and issubclass(f, torch.nn.Module)):
            continue
        if f.__module__ != "bnn_mnist":
            continue
        for p in inspect.signature(f).parameters.values():
            setting = "unc_samples" if p.name == "num_samples" and name in UNC else SAME_AS.get(p.name, p.name)
            if p.name in ("seed", "device") or (name, p.name) == ("make_svi", "lr_decay"):
                continue  # fixed draws' seeds, not --seed; where a file loads, not --device; a per-step decay
            if name in ("model", "guide") and p.name == "kl_weight":
                assert p.default == 1.0  # called alone, model and guide are the article's joint
                continue
            if p.default is not inspect.Parameter.empty and hasattr(bm.DEFAULTS, setting) and p.default is not None:
                assert p.default == getattr(bm.DEFAULTS, setting), (name, p.name)
                checked += 1
    assert checked >= 30  # the check reaches the library, not an empty set


def test_the_readme_flag_table_states_the_configs_defaults():
    rows = [line.split("|")[1:3] for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("| `--") and line.count("|") >= 4]
    assert len(rows) >= 8
    for flags, defaults in rows:
        names = [f.strip("` ").lstrip("-").replace("-", "_") for f in flags.split(",")]
        values = [v.strip("` ") for v in (defaults.split(",") if len(names) > 1 else [defaults])] if defaults.strip() else []
        for name, value in zip(names, values):
            default = getattr(bm.DEFAULTS, name)
            assert value == (f"{default:g}" if isinstance(default, float) else str(default)), name


# -----------------------------------------------------------------------------
# Each flag's accepted and refused values (exit code 2, one argparse line)


@pytest.mark.parametrize("flags", [
    ["--refuse-quantile", "0.5"], ["--refuse-quantile", "0.999"], ["--ambiguity-quantile", "0"],
    ["--ambiguity-quantile", "0.99"], ["--threshold", "0"], ["--threshold", "2.302"],
    ["--measure", "max_prob", "--threshold", "0.9"], ["--measure", "expected_entropy", "--threshold", "2.3"],
    ["--val-size", "0", "--threshold", "0.1", "--ambiguity-quantile", "0"], ["--val-size", "1"],
    ["--lr", "1e-9"], ["--max-batches", "1"], ["--ood", "none"], ["--rule", "median"], ["--rule", "quantiles"],
])
def test_values_on_the_edge_are_accepted(flags):
    bm.parse_args(flags)


NOTHING_OUT = "argument --val-size: 0 holds nothing out to set the thresholds"


@pytest.mark.parametrize("flags, message", [
    (["--refuse-quantile", "0"], "argument --refuse-quantile: must lie strictly between 0 and 1, got 0"),
    (["--refuse-quantile", "1"], "argument --refuse-quantile: must lie strictly between 0 and 1, got 1"),
    (["--ambiguity-quantile", "1"], "argument --ambiguity-quantile: must lie in [0, 1), got 1"),
    (["--ambiguity-quantile", "-0.1"], "argument --ambiguity-quantile: must lie in [0, 1), got -0.1"),
    (["--threshold", "2.31"], "argument --threshold: mutual_information lies in [0, 2.303], got 2.31"),
    (["--threshold", "-0.01"], "argument --threshold: mutual_information lies in [0, 2.303], got -0.01"),
    (["--measure", "max_prob", "--threshold", "0.91"], "argument --threshold: max_prob lies in [0, 0.9], got 0.91"),
    (["--val-size", "-1"], "argument --val-size: must be >= 0, got -1"),
    (["--val-size", "0"], NOTHING_OUT),
    (["--val-size", "0", "--threshold", "0.1"], f"{NOTHING_OUT}; give --threshold and --ambiguity-quantile 0"),
    (["--val-size", "0", "--ambiguity-quantile", "0"], f"{NOTHING_OUT}; give --threshold and --ambiguity-quantile 0"),
    (["--lr", "inf"], "argument --lr: must be > 0, got inf"),
    (["--lr", "0"], "argument --lr: must be > 0, got 0"),
    (["--prior-scale", "-1"], "argument --prior-scale: must be > 0, got -1"),
    (["--kl-weight", "0"], "argument --kl-weight: must be > 0, got 0"),
    (["--max-batches", "1.5"], "argument --max-batches: not an integer: '1.5'"),
    (["--lr", "fast"], "argument --lr: not a number: 'fast'"),
    (["--ood", "noise,cifar,svhn"], "argument --ood: unknown set(s) cifar, svhn (choose from"),
    (["--elbo", "exact"], "argument --elbo: invalid choice: 'exact'"),
    (["--rule", "mean"], "argument --rule: invalid choice: 'mean'"),
])
def test_refused_values_exit_2_with_one_message(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        bm.parse_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("text, sets", [("none", ""), (" noise , fashion ", "noise,fashion"), ("notmnist,", "notmnist"),
                                        ("fashion,notmnist,noise", "fashion,notmnist,noise")])
def test_ood_list_is_parsed(text, sets):
    assert bm.parse_args(["--ood", text]).ood == sets


def test_training_kwargs_hand_every_training_flag_to_train():
    cfg = bm.parse_args(["--epochs", "2", "--batch-size", "3", "--lr", "0.1", "--lr-decay", "0.2", "--scale-lr-factor",
                         "4", "--prior-scale", "0.3", "--kl-weight", "0.7", "--elbo", "meanfield", "--max-batches", "9"])
    assert bm.training_kwargs(cfg) == dict(epochs=2, batch_size=3, lr=0.1, lr_decay=0.2, scale_lr_factor=4.0,
                                           prior_scale=0.3, kl_weight=0.7, elbo="meanfield", kl_per_batch=False,
                                           max_batches=9)


# -----------------------------------------------------------------------------
# Exit codes and what is kept


def test_ctrl_c_outside_training_exits_130_and_keeps_metrics(tmp_path, data_dir, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bm, "uncertainty_report", interrupted)
    with pytest.raises(SystemExit) as e:
        bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", *TINY])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == f"interrupted; what was already written to {tmp_path} is kept"
    import json
    m = json.loads((tmp_path / "metrics.json").read_text())  # the forced prediction, written before
    assert m["epochs"] == 1 and 0 <= m["test_accuracy"] <= 1 and "calibration" not in m
    assert (tmp_path / "guide.pt").exists()


def test_an_interrupted_run_exits_128_plus_the_signal(tmp_path, data_dir, monkeypatch, capsys):
    def stopped(*a, **k):
        raise bm.Interrupted("interrupted at epoch 1 step 2", 15)

    monkeypatch.setattr(bm, "train", stopped)
    with pytest.raises(SystemExit) as e:
        bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", *TINY])
    assert e.value.code == 143
    assert capsys.readouterr().err.strip() == (f"interrupted at epoch 1 step 2; checkpoint saved to "
                                               f"{tmp_path / 'checkpoint.pt'}: run again with --resume to continue")


def test_a_val_size_as_big_as_the_training_set_is_an_error_exit_1(tmp_path, data_dir, capsys):
    with pytest.raises(SystemExit) as e:
        bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), *TINY, "--val-size", "600"])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == "error: val_size 600 must lie in [0, 600): the set has 600 images"


# -----------------------------------------------------------------------------
# Metrics by hand


def test_brier_nll_accuracy_by_hand_on_two_images():
    probs = torch.tensor([[0.7, 0.2, 0.1] + [0.0] * 7, [0.1, 0.6, 0.3] + [0.0] * 7])
    y = torch.tensor([0, 2])
    m = bm.evaluate(probs, y)
    # image 1: (0.3^2 + 0.2^2 + 0.1^2) = 0.14; image 2: (0.1^2 + 0.6^2 + 0.7^2) = 0.86
    assert m["brier"] == pytest.approx((0.14 + 0.86) / 2)
    assert m["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    assert m["accuracy"] == 0.5
    # ECE, 15 bins: 0.7 in bin 10 (right), 0.6 in bin 9 (wrong): (|1 - 0.7| + |0 - 0.6|) / 2
    assert m["ece"] == pytest.approx((0.3 + 0.6) / 2)


def test_ece_by_hand_on_three_bins():
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55, 0.55, 0.25])
    right = torch.tensor([True, False, True, True, False, True])
    y = torch.where(right, 0, 1)
    probs = torch.zeros(6, 10)
    probs[:, 0] = conf
    probs[:, 2:] = ((1 - conf) / 8)[:, None]  # class 1 (the wrong answer) gets nothing
    # three occupied 15-bins: {0.95}: acc 1/2 conf 0.95; {0.55}: acc 2/3 conf 0.55; {0.25}: acc 1 conf 0.25
    expected = 2 / 6 * abs(0.5 - 0.95) + 3 / 6 * abs(2 / 3 - 0.55) + 1 / 6 * abs(1 - 0.25)
    assert bm.expected_calibration_error(probs, y) == pytest.approx(expected)
    count, mean_conf, acc = bm.calibration_bins(probs, y)
    assert count[[14, 8, 3]].tolist() == [2, 3, 1] and count.sum() == 6
    assert acc[8].item() == pytest.approx(2 / 3) and mean_conf[3].item() == pytest.approx(0.25)
    # 10 bins put 0.55 and 0.95 in other bins but give the same ECE here; 2 bins merge 0.55 and 0.95
    merged = 5 / 6 * abs(3 / 5 - (2 * 0.95 + 3 * 0.55) / 5) + 1 / 6 * abs(1 - 0.25)
    assert bm.expected_calibration_error(probs, y, bins=2) == pytest.approx(merged)


def test_auroc_counts_pairs():
    rng = np.random.default_rng(0)
    score_in = np.round(rng.random(40), 1)  # many ties
    score_out = np.round(rng.random(30) + 0.3, 1)
    pairs = ((score_out[None] > score_in[:, None]) + 0.5 * (score_out[None] == score_in[:, None])).mean()
    assert bm.auroc(torch.tensor(score_in), torch.tensor(score_out)) == pytest.approx(pairs)
    assert bm.auroc(torch.tensor(score_out), torch.tensor(score_in)) == pytest.approx(1 - pairs)
    # a small table: in (0.1, 0.4, 0.4), out (0.4, 0.5): pairs 1 + 0.5 + 0.5 + 1 + 1 + 1 = 5 of 6
    assert bm.auroc(torch.tensor([0.1, 0.4, 0.4]), torch.tensor([0.4, 0.5])) == pytest.approx(5 / 6)


def test_thresholds_are_numpy_quantiles_and_refuse_that_fraction():
    u = {"mutual_information": torch.rand(1000, generator=torch.Generator().manual_seed(0)),
         "expected_entropy": torch.rand(1000, generator=torch.Generator().manual_seed(1))}
    rule = bm.thresholds(u, {"mutual_information": 0.9, "expected_entropy": 0.3})
    assert rule == {"mutual_information": pytest.approx(np.quantile(u["mutual_information"].double().numpy(), 0.9)),
                    "expected_entropy": pytest.approx(np.quantile(u["expected_entropy"].double().numpy(), 0.3))}
    assert float(bm.refuses({"mutual_information": u["mutual_information"]},
                            {"mutual_information": rule["mutual_information"]}).float().mean()) == pytest.approx(0.1)
    both = bm.refuses(u, rule).numpy()
    assert both.mean() == pytest.approx(((u["mutual_information"] > rule["mutual_information"])
                                         | (u["expected_entropy"] > rule["expected_entropy"])).float().mean().item())


def test_accuracy_coverage_curve_accepts_the_most_certain_first():
    score = torch.tensor([0.5, 0.1, 0.3, 0.2])
    correct = torch.tensor([False, True, False, True])
    cov, acc = bm.accuracy_coverage_curve(score, correct)
    # order by score: 0.1 (right), 0.2 (right), 0.3 (wrong), 0.5 (wrong)
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0] and acc.tolist() == pytest.approx([1, 1, 2 / 3, 0.5])


def test_abstention_of_a_rule_by_hand():
    refused = torch.tensor([True, False, False, False, True])
    correct = torch.tensor([False, True, False, True, True])
    a = bm.abstention(refused, correct)
    assert a == {"coverage": 0.6, "refused": pytest.approx(0.4), "accuracy_accepted": pytest.approx(2 / 3)}


def test_uncertainty_of_two_samples_by_hand():
    p = torch.tensor([[[0.5, 0.5] + [0.0] * 8], [[1.0, 0.0] + [0.0] * 8]])  # (2, 1, 10)
    u = bm.uncertainty(p)
    mean = [0.75, 0.25]
    pe = -sum(q * math.log(q) for q in mean)
    ee = (math.log(2) + 0) / 2
    assert u["predictive_entropy"].item() == pytest.approx(pe)
    assert u["expected_entropy"].item() == pytest.approx(ee)
    assert u["mutual_information"].item() == pytest.approx(pe - ee)
    assert u["max_prob"].item() == pytest.approx(0.25)


# -----------------------------------------------------------------------------
# The refusal rule, the prior and the held-out split: round trips


def test_expected_entropy_rule_uses_its_own_quantile_not_the_ambiguity_one(small_data):
    _, _, xt, _ = small_data
    net = ready_net(H, init_scale=0.5)
    pyro.set_rng_seed(3)
    rule = bm.refusal_rule(xt, net, "expected_entropy", quantile=0.5, ambiguity_quantile=0.99, num_samples=6)
    pyro.set_rng_seed(3)
    ee = bm.uncertainty(bm.sample_probs_local(xt, net, 6))["expected_entropy"]
    assert rule == {"expected_entropy": pytest.approx(np.quantile(ee.double().numpy(), 0.5))}


def test_refusal_rule_draws_the_samples_it_is_told(small_data):
    _, _, xt, _ = small_data
    net = ready_net(H, init_scale=0.5)
    pyro.set_rng_seed(3)
    rule = bm.refusal_rule(xt, net, "mutual_information", 0.9, 0.8, num_samples=4)
    pyro.set_rng_seed(3)
    u = bm.uncertainty(bm.sample_probs_local(xt, net, 4))
    assert rule == {"mutual_information": pytest.approx(np.quantile(u["mutual_information"].double().numpy(), 0.9)),
                    "expected_entropy": pytest.approx(np.quantile(u["expected_entropy"].double().numpy(), 0.8))}
    pyro.set_rng_seed(3)
    default = bm.refusal_rule(xt, net)  # the defaults: 100 samples, 0.98 and 0.965
    pyro.set_rng_seed(3)
    u = bm.uncertainty(bm.sample_probs_local(xt, net, 100))
    assert default == {"mutual_information": pytest.approx(np.quantile(u["mutual_information"].double().numpy(), 0.98)),
                       "expected_entropy": pytest.approx(np.quantile(u["expected_entropy"].double().numpy(), 0.965))}


def test_the_nets_rule_is_used_by_default_and_travels_with_the_guide(small_data, tmp_path):
    x, y, xt, _ = small_data
    x_tr, y_tr, x_val, _ = bm.holdout_split(x, y, 100)
    pyro.set_rng_seed(0)
    net = bm.BNN(784, H, 10)
    bm.train(net, x_tr, y_tr, epochs=1, batch_size=128, progress=False, log=lambda *a: None)
    assert net.rule is None  # training alone fits no rule
    with pytest.raises(ValueError, match=r"^no refusal rule: pass rule=, e\.g\. bm\.refusal_rule\(x_val, net\) "
                                         r"on held-out images$"):
        bm.predict_or_abstain(xt, net)
    net.rule = kept = bm.refusal_rule(x_val, net)
    assert set(kept) == {"mutual_information", "expected_entropy"}
    bm.save_guide(tmp_path / "g.pt", net)  # the rule travels with the guide
    loaded = bm.load_guide(tmp_path / "g.pt")
    assert loaded.rule == kept
    pyro.set_rng_seed(1)
    a = bm.predict_or_abstain(xt, loaded)
    pyro.set_rng_seed(1)
    assert torch.equal(a, bm.predict_or_abstain(xt, net, kept))


def test_the_prior_scale_survives_save_and_load_and_sets_the_loss(tmp_path, small_data):
    x, y, _, _ = small_data
    net = ready_net(H, init_scale=0.05)
    net.prior_scale = 0.1
    bm.save_guide(tmp_path / "g.pt", net)
    loaded = bm.load_guide(tmp_path / "g.pt")
    assert loaded.prior_scale == 0.1
    # the loaded net's ELBO is the one with its own prior, not the default N(0, 1)
    losses = {}
    for name, prior in (("loaded", None), ("explicit", 0.1), ("default", 1.0)):
        pyro.set_rng_seed(0)
        svi, _ = bm.make_svi(loaded, 0.01, prior_scale=prior, elbo="meanfield")
        with pyro.get_param_store().scope():
            losses[name] = svi.evaluate_loss(x[:32], y[:32], 600)
    assert losses["loaded"] == losses["explicit"] != losses["default"]


def test_make_svi_uses_the_prior_scale_it_is_given():
    net = bm.BNN(784, H, 10)
    svi, _ = bm.make_svi(net, 0.01, prior_scale=0.25)
    with pyro.get_param_store().scope():
        tr = pyro.poutine.trace(svi.model).get_trace(torch.rand(3, 784), torch.arange(3), 10)
    assert float(tr.nodes["out_bias"]["fn"].base_dist.scale.max()) == 0.25
    assert tr.nodes["out_bias"]["scale"] == bm.DEFAULTS.kl_weight  # the default objective


def test_the_guide_alone_is_the_articles_and_svis_guide_is_tempered():
    net = bm.BNN(784, H, 10)
    svi, _ = bm.make_svi(net, 0.01)
    with pyro.get_param_store().scope():
        alone, in_svi = (pyro.poutine.trace(g).get_trace(net=net) for g in (bm.guide, svi.guide))
    assert all(alone.nodes[k]["scale"] == 1.0 and in_svi.nodes[k]["scale"] == 0.01 for k in net.loc)


def test_init_scale_is_the_guides_starting_std():
    net = bm.BNN(784, H, 10, init_scale=0.2)
    for k in net.rho:
        assert torch.allclose(torch.nn.functional.softplus(net.rho[k]), torch.full_like(net.rho[k], 0.2))
    assert bm.inverse_softplus(0.2) == pytest.approx(math.log(math.expm1(0.2)))


def test_inverse_softplus_takes_a_tensor_of_scales_too():
    scales = torch.tensor([1e-6, 0.003, 0.2, 5.0, 50.0], dtype=torch.float64)
    rho = bm.inverse_softplus(scales)
    assert torch.allclose(torch.nn.functional.softplus(rho), scales, rtol=1e-9, atol=0)
    assert rho[2].item() == pytest.approx(bm.inverse_softplus(0.2))


def test_predict_or_abstain_answers_the_many_sample_class_where_it_accepts():
    net = ready_net(16, init_scale=2.0)  # samples that disagree a lot
    x = torch.rand(200, 784, generator=torch.Generator().manual_seed(0))
    pyro.set_rng_seed(0)
    answers = bm.predict_or_abstain(x, net, {"max_prob": 1.0}, num_samples=50)  # never refuses
    pyro.set_rng_seed(0)
    assert torch.equal(answers, bm.sample_probs_local(x, net, 50).mean(0).argmax(-1))
    pyro.set_rng_seed(0)
    one = bm.sample_probs_local(x, net, 1)[0].argmax(-1)
    assert (one != answers).float().mean() > 0.1  # one sample's class is another answer


# -----------------------------------------------------------------------------
# What a call must leave as it found it, for the notebook that made it


def test_main_in_a_notebook_gives_the_signal_handlers_back_even_when_it_fails(tmp_path, data_dir, monkeypatch):
    import signal

    def mine(signum, frame):  # a notebook's own handlers, e.g. Jupyter's
        pass

    before = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path / "a"), "--epochs", "1", "--max-batches", "2",
                 *TINY])
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine

        def diverged(*a, **k):
            raise bm.Error("loss became nan at epoch 1 step 1")

        monkeypatch.setattr(bm, "train_epoch", diverged)
        with pytest.raises(SystemExit):
            bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path / "b"), "--epochs", "1", *TINY])
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_pyros_predictive_leaves_the_param_store_as_it_was():
    net = ready_net(H, init_scale=0.1)
    pyro.clear_param_store()
    pyro.param("a_users_own", torch.ones(2))  # something the notebook keeps in the global store
    bm.pyro_predictive_prob(torch.rand(3, 784), net, 4)
    assert list(pyro.get_param_store().keys()) == ["a_users_own"]
    assert torch.equal(pyro.param("a_users_own"), torch.ones(2))
