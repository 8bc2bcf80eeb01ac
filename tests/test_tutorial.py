"""docs/tutorial.ipynb runs end to end (smoke switch, tiny data) and its committed outputs come
from a real run on the full training set."""

import re

import nbformat
from nbclient import NotebookClient

from conftest import ROOT

TUTORIAL = ROOT / "docs" / "tutorial.ipynb"


def test_tutorial_runs_end_to_end_on_tiny_data(data_dir, monkeypatch):
    monkeypatch.setenv("BNN_MNIST_SMOKE", "1")
    monkeypatch.setenv("BNN_MNIST_DATA", str(data_dir))
    nb = nbformat.read(TUTORIAL, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(TUTORIAL.parent)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for expected in (r"training \(500, 784\) held out \(100, 784\) test \(200, 784\)", "obs", "-ELBO estimate",
                     r"epoch 1/1\s+loss", "test accuracy", "predict_prob vs Predictive", "MNIST test refused",
                     "uniform noise refused", r"mirrored\s+AUROC", r"rotated 45 degrees: accuracy"):
        assert re.search(expected, text), expected  # what each step prints, not its spacing
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 3  # the article's plot, the posterior's scale per pixel, your own digit (no letters)


def test_committed_outputs_come_from_a_full_run():
    nb = nbformat.read(TUTORIAL, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs for c in code[1:]), "run it: see the README's tutorial section"
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "training (55000, 784) held out (5000, 784) test (10000, 784)" in text
    assert "notMNIST-459 refused" in text
