"""The benchmark still runs and prints its table (its numbers are not asserted: speed
targets live in the benchmark's output, not in timed tests)."""

import math
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402
import bnn_mnist as bm  # noqa: E402


def test_benchmark_runs_and_prints_the_table(capsys):
    out = bench.main(["--steps", "3", "--warmup", "1", "--rounds", "1", "--num-samples", "2"])
    text = capsys.readouterr().out
    for row in ("train images/s", "train s/epoch (469 steps)", "predict s, 10k x 2 samples", "peak RSS"):
        assert row in text
    assert all(math.isfinite(v) and v > 0 for v in out.values())


def test_baselines_print_the_side_by_side_table(data_dir, capsys):
    import baselines  # noqa: E402  (laplace-torch is optional: benchmarks/requirements.txt)

    rows = baselines.main(["--data-dir", str(data_dir), "--methods", "mlp,bnn", "--epochs", "2",
                           "--hidden-size", "16", "--val-size", "100", "--unc-samples", "10", "--ood", "noise"])
    text = capsys.readouterr().out
    assert "| system | accuracy | nll | ece | AUROC noise | refused MNIST | refused noise |" in text
    assert set(rows) == {"plain MLP (max_prob)", f"bnn_mnist defaults ({bm.DEFAULTS.measure})"}
    for row in rows.values():
        assert 0.7 < row["accuracy"] <= 1 and 0 <= row["refused MNIST"] <= 0.2
    bnn = rows[f"bnn_mnist defaults ({bm.DEFAULTS.measure})"]
    # noise must score above the digits, and be refused far more often than they are
    assert bnn["AUROC noise"] > 0.9 and bnn["refused noise"] > bnn["refused MNIST"] + 0.3


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
    with pytest.raises(bm.SettingsError, match="norule.pt holds no refusal rule"):
        rf.main(["--guide", str(tmp_path / "norule.pt"), "--data-dir", str(data_dir)])
