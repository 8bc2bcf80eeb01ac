"""The benchmark still runs and prints its table (its numbers are not asserted: speed
targets live in the benchmark's output, not in timed tests)."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402
import bnn_mnist as bm  # noqa: E402


@pytest.mark.parametrize("elbo", bm.ELBOS)
def test_benchmark_runs_and_prints_the_table(capsys, elbo):
    jit = ["--jit"] if elbo == "trace" else []
    out = bench.main(["--steps", "3", "--warmup", "1", "--rounds", "1", "--num-samples", "2", "--elbo", elbo,
                      "--unc-samples", "3", "--unc-images", "40", *jit])
    text = capsys.readouterr().out
    for row in ("train images/s", "train s/epoch (469 steps)", "predict s, 10k x 2 samples", "peak RSS",
                "uncertainty, 40 images x 3 samples", "per-image is", *(["JitTrace_ELBO"] if jit else [])):
        assert row in text
    samplers = out.pop("samplers")
    assert set(samplers) == {"weight sets", "weight-set floor", "per-image", "per-image floor"}
    assert math.isinf(out.pop("jit_ratio")) != bool(jit)
    assert all(math.isfinite(v) and v > 0 for v in [*out.values(), *samplers.values()])


def test_the_floor_draws_the_local_estimator_as_bnn_mnist_does():
    """--elbo local: the hand-written floor computes the very loss bnn_mnist's SVI minimises
    (same draws from the same seed), so the two sides time the same work."""
    net = bm.BNN(784, 16, 10, init_scale=0.2)
    x, y = torch.rand(32, 784), torch.randint(0, 10, (32,))
    torch.manual_seed(3)
    ours = bm.local_reparam_loss(None, None, x, y, 600, net=net, kl_weight=0.0)
    torch.manual_seed(3)
    scales = {k: torch.nn.functional.softplus(r) for k, r in net.rho.items()}
    floor = torch.nn.functional.cross_entropy(bench.floor_local_logits(net.loc, scales, x), y, reduction="sum") * 600 / 32
    assert ours.item() == pytest.approx(floor.item(), rel=1e-5)
    torch.manual_seed(3)  # and the KL term: the same draws, the loss at kl_weight 0.5, prior N(0, 0.3)
    ours = bm.local_reparam_loss(None, None, x, y, 600, net=net, prior_scale=0.3, kl_weight=0.5)
    kl = bench.floor_kl(list(net.loc.values()), list(scales.values()), None, 0.3)
    assert ours.item() == pytest.approx(floor.item() + 0.5 * kl.item(), rel=1e-5)


def test_baselines_print_every_table_with_the_control_recomputed(data_dir, tmp_path, capsys):
    import json

    import baselines  # noqa: E402  (laplace-torch is optional: benchmarks/requirements.txt)
    import numpy as np

    runs = baselines.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--methods",
                           "mlp,ensemble,dropout,bnn", "--epochs", "2", "--hidden-size", "16", "--val-size", "100",
                           "--unc-samples", "10", "--ood", "noise", "--shift-size", "60", "--seeds", "0", "1"])
    text = capsys.readouterr().out
    assert "| system | noise | rotated 90 | rotated 180 | mirrored | overlaid |" in text
    assert "| system | accuracy | nll | ece | selective_measure | accuracy_kept | AURC x 1000 | train_seconds |" in text
    assert "Rotated test digits: ece by angle (degrees)\n| system | 0 | 15 | 30 | 45 | 60 | 90 | 135 | 180 |" in text
    assert list(runs) == ["control (pixel rarity)", "plain MLP", "5-MLP ensemble", "MC dropout p=0.5",
                          "bnn_mnist defaults"] and all(len(rs) == 2 for rs in runs.values())
    saved = json.loads((tmp_path / "baselines.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["runs"]["plain MLP"][1]["nll"] == runs["plain MLP"][1]["nll"]
    assert (tmp_path / "shift.png").stat().st_size > 0
    summary = text[text.index("| | control (pixel rarity) |"):text.index("AUROC, MNIST test against")]
    assert "| AURC x 1000 |  | " in summary and "| AUROC noise | 1.000 ± 0.000 | " in summary  # control: AUROC only
    baselines.main(["--show", str(tmp_path / "baselines.json")])  # the same tables again, from the file
    assert summary in capsys.readouterr().out
    # the control by hand: numpy pixel frequencies of the training split, pairs counted
    x, y = bm.load_mnist(data_dir)
    x_train = bm.holdout_split(x, y, 100)[0].numpy()
    freq = (x_train > 0).mean(0)
    x_test = bm.load_mnist(data_dir, train=False)[0].numpy()
    noise = torch.rand(2000, 784, generator=torch.Generator().manual_seed(1)).numpy()
    s_in, s_out = (x_test / (freq + 1e-4)).sum(1), (noise / (freq + 1e-4)).sum(1)
    pairs = (s_out[:, None] > s_in[None]).mean() + 0.5 * (s_out[:, None] == s_in[None]).mean()
    assert runs["control (pixel rarity)"][0]["auroc"]["noise"] == pytest.approx(pairs, abs=1e-6)
    # a single network has no disagreement; an ensemble and dropout masks do
    assert all(r["mutual_information"] == 0 for r in runs["plain MLP"][0]["shift"].values())
    for name in ("5-MLP ensemble", "MC dropout p=0.5"):
        assert all(r["mutual_information"] > 0 for r in runs[name][0]["shift"].values()), name
    for rs in list(runs.values())[1:]:
        assert rs[0]["selective_measure"] in bm.MEASURES and 0.5 < rs[0]["accuracy"] <= 1  # chance: 0.1
    bnn = runs["bnn_mnist defaults"][0]
    assert bnn["auroc"]["noise"] > 0.9  # noise scores above the digits
    assert bnn["shift"][0]["accuracy"] > bnn["shift"][90]["accuracy"]  # turned digits are harder


def test_refusal_frontier_refuses_the_most_uncertain_and_reports_both_splits(data_dir, tmp_path, capsys):
    import refusal_frontier as rf
    from conftest import ready_net

    correct = torch.tensor([True] * 95 + [False] * 5)
    errors_last = {"m": torch.arange(100.0)}  # the 5 errors are the most uncertain: all refused
    errors_first = {"m": -torch.arange(100.0)}  # ... the least uncertain: 5 correct ones refused
    assert rf.best_single(errors_last, correct, 0.05) == {"m": 1.0}
    assert rf.best_single(errors_first, correct, 0.05)["m"] == pytest.approx(90 / 95)
    u = {"mutual_information": torch.zeros(100), "expected_entropy": torch.arange(100.0)}
    assert rf.best_pair(u, correct, 0.05) == 1.0 and rf.best_pair(u, correct, 0.02) == pytest.approx(95 / 98)

    net = ready_net()
    bm.save_guide(tmp_path / "guide.pt", net, rule={"mutual_information": 0.01, "expected_entropy": 1.0})
    rf.main(["--guide", str(tmp_path / "guide.pt"), "--data-dir", str(data_dir), "--val-size", "100",
             "--unc-samples", "4"])
    text = capsys.readouterr().out
    assert "held-out training digits:" in text and "errors in 100;" in text
    assert "MNIST test digits:" in text and "errors in 200;" in text and "best MI/EE pair" in text
    with pytest.raises(SystemExit):
        rf.main(["--guide", str(tmp_path / "guide.pt"), "--budget", "1"])
    assert "--budget: must be in (0, 1), got 1.0" in capsys.readouterr().err
    bm.save_guide(tmp_path / "norule.pt", net)
    with pytest.raises(bm.Error, match="norule.pt holds no refusal rule"):
        rf.main(["--guide", str(tmp_path / "norule.pt"), "--data-dir", str(data_dir)])


def test_sweep_runs_a_grid_appends_each_run_and_reprints_it_with_the_control(data_dir, tmp_path, capsys):
    import json

    import sweep  # noqa: E402

    out = tmp_path / "runs.jsonl"
    argv = ["--data-dir", str(data_dir), "--seeds", "0", "--shift-size", "40", "--out", str(out),
            "--grid", "hidden_size=16", "val_size=100", "epochs=1", "unc_samples=5", "kl_weight=0.01,1"]
    runs = sweep.main(argv)
    printed = capsys.readouterr().out
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["settings"]["kl_weight"] for r in lines] == [0.01, 1.0] and lines == runs
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 2 + 1  # header, rule, two settings, the control
    control = sweep.control_row(str(data_dir), 40, runs)  # the pixel counter on the same held-out sets
    cells = ["", "", ""] + [f"{control[f'AUROC {k}']:.3f}" for k in [*bm.NEAR_OOD, "shuffled"]] + [""] * 12
    assert rows[-1] == "| control (pixel rarity) | | " + " | ".join(cells) + " |"  # AUROC columns only
    assert f"{lines[1]['AUROC mirrored']:.3f}" in rows[3]
    # the control by hand: numpy inking frequencies of the training split, mirrored held-out digits, pairs
    x, y = bm.load_mnist(data_dir)
    x_train, _, x_val, y_val = (t.numpy() for t in bm.holdout_split(x, y, 100))
    pick = bm.shifted_sets(torch.from_numpy(x_val), torch.from_numpy(y_val), 40)[0].numpy()
    freq = (x_train > 0).mean(0)
    s_in = (x_val / (freq + 1e-4)).sum(1)
    s_out = (x_val[pick].reshape(-1, 28, 28)[:, :, ::-1].reshape(-1, 784) / (freq + 1e-4)).sum(1)
    pairs = (s_out[:, None] > s_in[None]).mean() + 0.5 * (s_out[:, None] == s_in[None]).mean()
    assert control["AUROC mirrored"] == pytest.approx(pairs, abs=1e-5)
    sweep.main(["--show", str(out), "--data-dir", str(data_dir), "--shift-size", "40"])  # no training
    assert capsys.readouterr().out == printed
    (tmp_path / "second.jsonl").write_text(json.dumps(dict(runs[0], seed=1)) + "\n")  # a second file: one table
    sweep.main(["--show", str(out), str(tmp_path / "second.jsonl"), str(out),  # the first again: counted once
                "--data-dir", str(data_dir), "--shift-size", "40"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 2 + 1 and rows[2].startswith("| epochs=1, hidden_size=16, "
                                                         "unc_samples=5, val_size=100 | 0,1 |")  # both seeds


def test_sweep_inflate_scores_one_training_with_wider_scales_and_draws_the_frontier(data_dir, tmp_path):
    import json

    import sweep

    out, png = tmp_path / "runs.jsonl", tmp_path / "frontier.png"
    grid = ["--data-dir", str(data_dir), "--seeds", "0", "--shift-size", "40", "--out", str(out),
            "--grid", "hidden_size=16", "val_size=100", "epochs=1", "unc_samples=5"]
    runs = sweep.main([*grid, "--inflate", "1", "3"])
    assert [r["settings"].get("inflate") for r in runs] == [None, 3.0]  # the plain run keeps the defaults' name
    assert runs[0]["train s"] == runs[1]["train s"] and runs[0]["ece"] != runs[1]["ece"]  # one training
    runs = sweep.main([*grid, "--members", "2"])
    assert list(sweep.grouped(runs)) == ["epochs=1, hidden_size=16, unc_samples=5, val_size=100",
                                         "epochs=1, hidden_size=16, inflate=3.0, unc_samples=5, val_size=100",
                                         "epochs=1, hidden_size=16, members=2, unc_samples=5, val_size=100"]
    sweep.main(["--show", str(out), "--data-dir", str(data_dir), "--shift-size", "40", "--frontier", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(json.loads(out.read_text().splitlines()[1])) > 3


def test_sweep_scores_every_member_with_each_factors_scales(data_dir, monkeypatch):
    """--members 2 --inflate 1 2: two nets trained from different seeds, each scored as trained and
    then with its scales exactly doubled (the scores themselves are random draws; the nets are not)."""
    import sweep

    seen, score_run = [], sweep.score_run

    def spy(nets, *args):
        seen.append([{k: F.softplus(r).clone() for k, r in net.rho.items()} for net in nets])
        return score_run(nets, *args)

    monkeypatch.setattr(sweep, "score_run", spy)
    sweep.main(["--data-dir", str(data_dir), "--seeds", "0", "--shift-size", "40", "--members", "2",
                "--inflate", "1", "2", "--grid", "hidden_size=16", "val_size=100", "epochs=1", "unc_samples=4"])
    assert [len(nets) for nets in seen] == [2, 2]
    assert not torch.equal(seen[0][0]["fc1_weight"], seen[0][1]["fc1_weight"])  # two trainings
    for plain, wide in zip(seen[0], seen[1]):
        for k in plain:
            torch.testing.assert_close(wide[k], 2 * plain[k])


def test_the_frontier_plots_each_settings_means_against_its_ece_at_45(tmp_path):
    import sweep

    runs = [{"settings": {}, "seed": 0, "accuracy": 0.98, "ECE 45": 0.25, "AURC x1000": 0.8},
            {"settings": {}, "seed": 1, "accuracy": 0.96, "ECE 45": 0.15, "AURC x1000": 1.0},
            {"settings": {"kl_weight": 0.1}, "seed": 0, "accuracy": 0.975, "ECE 45": 0.3, "AURC x1000": 1.2}]
    fig = sweep.plot_frontier(runs, tmp_path / "frontier.png")
    points = [[tuple(line.get_xydata()[0]) for line in ax.lines if line.get_marker() != "None"] for ax in fig.axes]
    assert points == [[pytest.approx((0.20, 0.97)), pytest.approx((0.3, 0.975))],
                      [pytest.approx((0.20, 0.9)), pytest.approx((0.3, 1.2))]]
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_pooled_probs_shares_the_samples_out_over_the_nets():
    import sweep

    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(bm.BNN(784, 8, 10, init_scale=1e-6))
        nets[-1].trained.fill_(True)
    sets = {"a": torch.rand(4, 784), "b": torch.rand(3, 784)}
    probs = sweep.pooled_probs(sets, nets, 5)
    assert [tuple(p.shape) for p in probs.values()] == [(5, 4, 10), (5, 3, 10)]
    for k, x in sets.items():  # samples 0-2 from the first net, 3-4 from the second (near-point posteriors)
        for i, net in enumerate(nets):
            mean = torch.softmax(net(x), -1)
            torch.testing.assert_close(probs[k][[0, 1, 2] if i == 0 else [3, 4]], mean.expand(3 - i, -1, -1),
                                       atol=1e-4, rtol=0)


def test_inflated_multiplies_every_scale_and_leaves_the_net_alone():
    import sweep

    net = bm.BNN(784, 8, 10, init_scale=0.05)
    wide = sweep.inflated(net, 2.5)
    for k in net.loc:
        assert torch.equal(wide.loc[k], net.loc[k])
        torch.testing.assert_close(F.softplus(wide.rho[k]), 2.5 * F.softplus(net.rho[k]))
        torch.testing.assert_close(F.softplus(net.rho[k]), torch.full_like(net.rho[k], 0.05))  # untouched
    assert sweep.inflated(net, 1) is net



def assert_widened(wide, plain, factor_of):
    """Each posterior scale of wide is factor_of(site name) times plain's."""
    for k in plain.rho:
        torch.testing.assert_close(F.softplus(wide.rho[k]), factor_of(k) * F.softplus(plain.rho[k]))


def test_inflated_only_widens_the_named_layer_and_the_sweep_records_it(data_dir, monkeypatch):
    import sweep

    net = bm.BNN(784, 8, 10, init_scale=0.05)
    assert_widened(sweep.inflated(net, 3.0, only="fc1"), net, lambda k: 3.0 if k.startswith("fc1") else 1.0)
    seen, score_run = [], sweep.score_run
    monkeypatch.setattr(sweep, "score_run", lambda nets, *a: seen.append(nets[0]) or score_run(nets, *a))
    runs = sweep.main(["--data-dir", str(data_dir), "--seeds", "0", "--shift-size", "40", "--inflate", "1", "2",
                       "--inflate-only", "out", "--grid", "hidden_size=16", "val_size=100", "epochs=1",
                       "unc_samples=4"])
    assert [r["settings"].get("inflate_only") for r in runs] == [None, "out"]  # the plain run is the defaults'
    assert_widened(seen[1], seen[0], lambda k: 2.0 if k.startswith("out") else 1.0)


def test_the_warmup_probe_without_warmup_trains_exactly_as_train(small_data):
    """benchmarks/warmup_probe.py compares its rows with sweep.py's: at --warmup-epochs 0 it must be
    bnn_mnist.train itself (same seed, same numbers), and a warm-up must change them."""
    import dataclasses

    import pyro
    import warmup_probe

    x, y, _, _ = small_data
    cfg = dataclasses.replace(bm.DEFAULTS, epochs=2, batch_size=64, kl_weight=1.0, elbo="local")
    nets = {}
    for name, warmup in (("train", None), ("probe", 0.0), ("warm", 1.0)):
        pyro.set_rng_seed(0)
        nets[name] = bm.BNN(784, 16, 10)
        if warmup is None:
            bm.train(nets[name], x, y, progress=False, log=lambda *a: None, **bm.training_kwargs(cfg))
        else:
            warmup_probe.train_with_warmup(nets[name], x, y, cfg, warmup)
    for k in nets["train"].loc:
        assert torch.equal(nets["probe"].loc[k], nets["train"].loc[k])
        assert torch.equal(nets["probe"].rho[k], nets["train"].rho[k])
    assert not torch.equal(nets["warm"].rho["fc1_weight"], nets["train"].rho["fc1_weight"])


def test_a_later_grid_field_overrides_an_earlier_one():
    """docs/contributing/choosing-defaults.md reruns old sweeps as `--grid $OLD lr=0.002,0.005`, OLD holding lr=0.003."""
    import sweep

    assert sweep.parse_grid(["lr=0.003", "kl_weight=0.003", "lr=0.002,0.005"]) == [
        {"lr": 0.002, "kl_weight": 0.003}, {"lr": 0.005, "kl_weight": 0.003}]


def test_every_table_in_choosing_defaults_prints_again_from_its_committed_sweep(capsys):
    """The rule for evidence: each sweep table in docs/contributing/choosing-defaults.md is what the `--show`
    command before it prints from the committed docs/contributing/sweeps/*.jsonl (the control row, which needs
    MNIST, aside). A table edited by hand, or a run appended without updating the doc, fails here."""
    import itertools
    import re

    import sweep

    lines = (ROOT / "docs/contributing/choosing-defaults.md").read_text().splitlines()
    command, checked = None, 0
    for i, line in enumerate(lines):
        m = re.search(r"sweep\.py --show (.*?) --data-dir", line)
        command = m.group(1).split() if m else command
        if line.startswith("| settings"):
            doc = [t for t in itertools.takewhile(lambda t: t.startswith("|"), lines[i:]) if "| control" not in t]
            sweep.main(["--show", *[str(ROOT / f) for f in command], "--data-dir", str(ROOT / "no-such-dir")])
            printed = [t for t in capsys.readouterr().out.splitlines() if t.startswith("|")]
            assert printed == doc, f"the table at line {i + 1} is not what {command} prints"
            checked += 1
    assert checked == 6


def printed_table(main, argv, capsys):
    main(argv)
    return [t for t in capsys.readouterr().out.splitlines() if t.startswith("|")]


def doc_table(path, first_cells):
    """The table in a doc whose header line starts with first_cells."""
    import itertools

    lines = (ROOT / path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_cells))
    return list(itertools.takewhile(lambda t: t.startswith("|"), lines[start:]))


def test_the_readme_article_table_is_what_its_command_prints(capsys):
    """how-it-works' "what each departure buys" table is `article_table.py --show`'s printout of the
    committed metrics (the README's, some of its rows), and its departures table is `--departures`'
    of the code's settings."""
    import article_table

    full = printed_table(article_table.main, ["--show"], capsys)
    assert doc_table("docs/how-it-works.md", "| | the article's reported") == full
    headline = doc_table("README.md", "| | the article's reported")  # the README keeps some of its rows
    assert headline[:2] == full[:2] and len(headline) >= 8 and all(row in full for row in headline)
    assert doc_table("docs/how-it-works.md", "| departure |") == printed_table(
        article_table.main, ["--departures"], capsys)
    runs = sorted(p.name for p in article_table.RESULTS.glob("*.json"))
    assert runs == sorted(f"{n}-seed{s}.json" for n in article_table.SETTINGS for s in (0, 1, 2))


def test_the_departures_table_follows_the_settings(capsys, monkeypatch):
    import article_table

    monkeypatch.setitem(bm.ARTICLE, "lr", 0.02)
    rows = printed_table(article_table.main, ["--departures"], capsys)
    assert "| Adam's learning rate | 0.005 | 0.02 | `--lr 0.02` |" in rows
    assert all(f"`--{name.replace('_', '-')}" in "".join(rows) for *_, name in article_table.DEPARTURES)


def test_baselines_merge_into_replaces_only_the_systems_it_ran(data_dir, tmp_path, capsys):
    import json

    import baselines  # noqa: E402

    args = ["--data-dir", str(data_dir), "--epochs", "1", "--hidden-size", "8", "--val-size", "100",
            "--unc-samples", "5", "--ood", "noise", "--shift-size", "30", "--seeds", "0"]
    baselines.main([*args, "--out-dir", str(tmp_path / "all"), "--methods", "mlp,bnn"])
    merged = tmp_path / "all" / "baselines.json"
    before = json.loads(merged.read_text())
    baselines.main([*args, "--out-dir", str(tmp_path / "bnn"), "--methods", "bnn", "--epochs", "2",
                    "--merge-into", str(merged)])
    after, alone = json.loads(merged.read_text()), json.loads((tmp_path / "bnn" / "baselines.json").read_text())
    assert after["runs"]["plain MLP"] == before["runs"]["plain MLP"]
    assert after["runs"]["bnn_mnist defaults"] == alone["runs"]["bnn_mnist defaults"] != before["runs"]["bnn_mnist defaults"]
    with pytest.raises(SystemExit):
        baselines.main([*args[:-1], "1", "--out-dir", str(tmp_path / "x"), "--methods", "bnn", "--merge-into", str(merged)])
    capsys.readouterr()


def test_samplers_compares_both_samplers_report_on_each_guide(data_dir, tmp_path, monkeypatch, capsys):
    import dataclasses

    import samplers

    monkeypatch.setattr(bm, "DEFAULTS", dataclasses.replace(bm.DEFAULTS, val_size=100, shift_size=20, unc_samples=6,
                                                            ood="noise", noise_count=30))
    guides = []
    for k in range(2):
        net = bm.BNN(784, 8, 10, init_scale=0.2)
        net.trained.fill_(True)
        bm.save_guide(tmp_path / f"g{k}.pt", net)
        guides.append(str(tmp_path / f"g{k}.pt"))
    results = samplers.main(["--data-dir", str(data_dir), "--guides", *guides, "--draws", "2"])
    rows = [t for t in capsys.readouterr().out.splitlines() if t.startswith("| ")]
    assert rows[0].startswith("| number | local") and any(t.startswith("| AUROC rotated 90 |") for t in rows)
    assert [len(g) for g in results["local"]] == [2, 2] and [len(g) for g in results["weights"]] == [2, 2]
    first = results["local"][0]
    assert first[0]["rule: mutual_information"] != first[1]["rule: mutual_information"]  # other random numbers


def test_the_readme_peers_rows_are_what_baselines_show_prints(capsys):
    import baselines

    baselines.main(["--show", str(ROOT / "docs/results/baselines.json")])
    printed = set(capsys.readouterr().out.splitlines())
    rows = doc_table("README.md", "| | control (pixel rarity)")
    assert len(rows) >= 8 and all(row in printed for row in rows)
