"""The README's notebook block runs as written (on a synthetic MNIST in ./data) and does what
its comments say."""

import re

import torch

import bnn_mnist as bm
from conftest import ROOT, make_mnist_dir


def readme_block():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "the README has one Python block: the notebook cheat-sheet"
    return blocks[0]


def test_readme_notebook_block_runs_as_written(tmp_path, monkeypatch):
    make_mnist_dir(tmp_path / "data", n_train=5600, n_test=100)  # enough for the default 5,000 held out
    monkeypatch.chdir(tmp_path)
    # the block as written, with a BNN whose hidden layer defaults to 64 units: 16x less work than 1024

    class SmallBNN(bm.BNN):
        def __init__(self, input_size=784, hidden_size=64, *args, **kwargs):
            super().__init__(input_size, hidden_size, *args, **kwargs)

    monkeypatch.setattr(bm, "BNN", SmallBNN)
    space = {}
    exec(compile(readme_block(), "README.md", "exec"), space)
    assert space["x_val"].shape == (5000, 784) and space["x_train"].shape == (600, 784)
    assert space["probs"].shape == (8, 10) and torch.allclose(space["probs"].sum(1), torch.ones(8))
    assert space["samples"].shape == (100, 1, 10) and set(space["scores"]) == set(bm.MEASURES)
    assert space["answer"].shape == (8,) and space["answer"].min() >= -1
    net, net2 = space["net"], space["net2"]
    assert net2.rule == net.rule and set(net.rule) == {bm.DEFAULTS.measure, "expected_entropy"}
    assert torch.equal(net2.loc["fc1_weight"], net.loc["fc1_weight"]) and net2.prior_scale == 1.0
    assert net.sizes == (784, 64, 10) and net2.sizes == net.sizes
    assert (tmp_path / "guide.pt").exists() and space["article"].trained
