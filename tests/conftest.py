"""Shared fixtures: a clean Pyro state per test and a tiny synthetic MNIST on disk.

The synthetic digits are written as real IDX files in torchvision's layout, so the tests
go through the same loading code as the real data set, without needing it.
"""

import gzip
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pyro
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest.ini runs one worker per core: each on one thread (and so every subprocess it starts),
    # or the workers' thread pools fight over the cores and the suite runs slower than serially
    os.environ["OMP_NUM_THREADS"] = "1"

import bnn_mnist as bm  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)


def write_idx(path, array, compress=False):
    """Write a uint8 array as an IDX file (magic 0x08 = unsigned byte, then its dims)."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.tobytes()
    Path(path).write_bytes(gzip.compress(data) if compress else data)


def synthetic_digits(n, seed=0):
    """n separable 28x28 'digits': class k is template k (fixed for all seeds) plus noise."""
    templates = np.random.default_rng(1234).random((10, 28, 28)) > 0.75
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = templates[labels] * 200.0 + rng.random((n, 28, 28)) * 55.0
    return images.astype(np.uint8), labels.astype(np.uint8)


def make_mnist_dir(root, n_train=600, n_test=200, dataset="MNIST"):
    raw = Path(root) / dataset / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for train, n, seed in ((True, n_train, 0), (False, n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        img_name, lbl_name = bm.MNIST_FILES[train]
        write_idx(raw / img_name, images)
        write_idx(raw / lbl_name, labels)
    return Path(root)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A read-only-by-convention synthetic MNIST folder shared by all tests."""
    return make_mnist_dir(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def fresh_data_dir(tmp_path):
    """A synthetic MNIST folder a test may damage."""
    return make_mnist_dir(tmp_path / "data")


@pytest.fixture
def progress_bars(monkeypatch):
    """Training's tqdm bars, hidden: a list of {"kwargs": what the bar was made with, "postfix": [...],
    "counted": the steps it was moved on by, "closed": whether it was closed}. Each bar is kept alive
    here, so "closed" is training's own close, not tqdm's on garbage collection."""
    import tqdm.auto

    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            self.record = {"kwargs": kwargs, "postfix": [], "counted": 0, "closed": False, "bar": self}
            bars.append(self.record)
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n=1):
            self.record["counted"] += n
            return super().update(n)

        def set_postfix(self, **kwargs):
            self.record["postfix"].append(kwargs)

        def close(self):
            self.record["closed"] = True
            return super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    return bars


@pytest.fixture(autouse=True)
def pyro_state():
    """Every test starts with an empty param store, seed 0 and Pyro's validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture
def small_data(data_dir):
    x, y = bm.load_mnist(data_dir, train=True)
    xt, yt = bm.load_mnist(data_dir, train=False)
    return x, y, xt, yt


SMALL = ["--hidden-size", "32", "--batch-size", "64", "--unc-samples", "20", "--noise-count", "100",
         "--val-size", "100"]


# a seconds-long CLI run on the synthetic digits
TINY = ["--hidden-size", "16", "--batch-size", "64", "--unc-samples", "10", "--ood", "noise",
        "--noise-count", "50", "--no-plots", "--lr", "0.01", "--val-size", "100"]


def ready_net(hidden=16, init_scale=1e-3):
    """A BNN whose posterior is still at its start, marked as trained so that it predicts."""
    net = bm.BNN(784, hidden, 10, init_scale=init_scale)
    net.trained.fill_(True)
    return net


def as_from_a_terminal():
    """preexec_fn for CLI subprocesses that get Ctrl-C: SIGINT at its default, as in a terminal, even
    when the test runner ignores it (a child that starts with SIGINT ignored never sees KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_env():
    """Environment for CLI subprocesses: no network (a dead proxy), unbuffered output."""
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    return env


def pytest_collection_modifyitems(config, items):
    """Under mutation testing (tests/mutmut_parts.py), the fastest tests first: a mutant is killed by
    its first failing test (-x), so a slow test that cannot see it should not run before a fast one
    that can. mutmut records each test's time in mutmut-stats.json, in the folder it runs from."""
    import json

    stats = Path("mutmut-stats.json")
    if "__mutmut_" in os.environ.get("MUTANT_UNDER_TEST", "") and stats.exists():
        seconds = json.loads(stats.read_text()).get("duration_by_test", {})
        items.sort(key=lambda item: seconds.get(item.nodeid, 0.0))
