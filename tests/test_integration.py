"""One real epoch on MNIST, when BNN_MNIST_DATA points at a copy (.ci/run sets it)."""

import json
import os
from pathlib import Path

import pytest

import bnn_mnist as bm

DATA = os.environ.get("BNN_MNIST_DATA", "")


@pytest.mark.skipif(not (DATA and (Path(DATA) / "MNIST/raw").is_dir()), reason="BNN_MNIST_DATA not set")
def test_one_epoch_on_real_mnist(tmp_path, capsys):
    m = bm.main(["--data-dir", DATA, "--out-dir", str(tmp_path), "--epochs", "1", "--ood", "noise",
                 "--unc-samples", "20", "--no-plots"])
    assert m["test_accuracy"] >= 0.96, m["test_accuracy"]
    assert m["test_nll"] <= 0.15 and m["calibration"]["ece"] <= 0.03
    assert m["auroc"]["noise"]["mutual_information"] >= 0.9
    assert json.loads((tmp_path / "metrics.json").read_text())["test_accuracy"] == m["test_accuracy"]
