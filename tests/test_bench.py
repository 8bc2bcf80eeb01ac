"""The benchmark still runs and prints its table (its numbers are not asserted: speed
targets live in the benchmark's output, not in timed tests)."""

import math
import sys

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
        assert 0.8 < row["accuracy"] <= 1 and 0 <= row["refused MNIST"] <= 0.2 and 0 <= row["AUROC noise"] <= 1
