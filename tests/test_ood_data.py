"""Out-of-distribution sets on a fresh machine: fetched once when missing, a clear error offline.

No network here or in CI: a local folder or archive stands in for each download.
"""

import functools
import gc
import http.server
import io
import threading
import warnings
import zipfile

import numpy as np
import pytest
import torchvision
from PIL import Image

import bnn_mnist as bm
from conftest import make_mnist_dir, synthetic_digits, write_idx


@pytest.fixture
def local_server(tmp_path, monkeypatch):
    """An HTTP server on localhost serving tmp_path/mirror (the stand-in for the internet)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "mirror").mkdir()
    handler = functools.partial(QuietHandler, directory=str(tmp_path / "mirror"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    with warnings.catch_warnings():  # torchvision leaves a failed download's socket to the GC
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def fashion_mirror(tmp_path, monkeypatch, local_server):
    """The four .gz files, served to torchvision as its download mirror."""
    mirror = tmp_path / "mirror"
    for train, n in ((True, 30), (False, 40)):
        images, labels = synthetic_digits(n, seed=7)
        for name, array in zip(bm.MNIST_FILES[train], (images, labels)):
            write_idx(mirror / (name + ".gz"), array, compress=True)
    resources = [(name + ".gz", None) for pair in bm.MNIST_FILES.values() for name in pair]  # no md5 to check
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", [local_server])
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "resources", resources)
    monkeypatch.setattr(bm, "FASHION_SYSTEM_DIR", str(tmp_path / "no-debian-package"))
    return mirror


def test_fashion_is_downloaded_once_into_the_data_dir(tmp_path, fashion_mirror):
    x = bm.load_fashion(tmp_path / "data")
    images, _ = synthetic_digits(40, seed=7)
    assert x.shape == (40, 784) and np.array_equal((x * 255).round().byte().numpy(), images.reshape(40, 784))
    assert (tmp_path / "data/FashionMNIST/raw/t10k-images-idx3-ubyte").exists()
    for f in fashion_mirror.iterdir():
        f.unlink()  # the mirror is gone: the copy on disk is read
    assert bm.load_fashion(tmp_path / "data").shape == (40, 784)


def test_fashion_offline_is_one_clear_error(tmp_path, fashion_mirror, monkeypatch):
    for f in fashion_mirror.iterdir():
        f.unlink()  # the server answers 404
    with pytest.raises(bm.Error) as e:
        bm.load_fashion(tmp_path / "data")
    assert str(e.value).startswith(f"Fashion-MNIST test files not found in {tmp_path / 'data/FashionMNIST/raw'} or "
                                   f"{bm.FASHION_SYSTEM_DIR} and the download failed (")


def letters_zip(path, top="bayesian-neural-network-mnist-master"):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for letter, value in (("A", 0), ("A", 128), ("J", 255)):
            png = io.BytesIO()
            Image.fromarray(np.full((28, 28), value, np.uint8)).save(png, format="PNG")
            z.writestr(f"{top}/not-mnist/{letter}/{value}.png", png.getvalue())
        z.writestr(f"{top}/bnn.ipynb", "{}")
        z.writestr(f"{top}/docs/figures/loss.png", png.getvalue())  # a picture of the repository, not a letter
        z.writestr(f"{top}/not-mnist/../../escape.png", b"not extracted")
    path.write_bytes(buf.getvalue())
    return path


def test_notmnist_is_fetched_once_from_the_articles_repository(tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "NOTMNIST_URL", letters_zip(tmp_path / "repo.zip").as_uri())
    x = bm.load_notmnist(tmp_path / "data")
    assert x.shape == (3, 784) and sorted(x[:, 0].tolist()) == pytest.approx([0, 128 / 255, 1])
    folder = tmp_path / "data/notMNIST-459"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")) == ["A/0.png", "A/128.png",
                                                                                      "J/255.png"]
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "data/notMNIST-459.part").exists()
    monkeypatch.setattr(bm, "NOTMNIST_URL", (tmp_path / "gone.zip").as_uri())
    assert bm.load_notmnist(tmp_path / "data").shape == (3, 784)  # not fetched again


def test_notmnist_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "NOTMNIST_URL", (tmp_path / "gone.zip").as_uri())
    with pytest.raises(bm.Error, match="no notMNIST-459 in .* the download from .* failed"):
        bm.load_notmnist(tmp_path / "data")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(bm.Error, match="download from .* failed"):
        bm.fetch_notmnist(tmp_path / "letters", url=(tmp_path / "bad.zip").as_uri())


def test_a_stalled_download_gives_up_within_a_minute_and_an_archive_without_letters_says_so(tmp_path, monkeypatch):
    import urllib.request

    asked = []
    real = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: asked.append(timeout) or real(url))
    empty = io.BytesIO()
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("repo-master/README.md", "no letters here")
    (tmp_path / "empty.zip").write_bytes(empty.getvalue())
    url = (tmp_path / "empty.zip").as_uri()
    with pytest.raises(bm.Error) as e:
        bm.fetch_notmnist(tmp_path / "letters", url=url)
    assert str(e.value) == f"the archive at {url} holds no not-mnist/<letter>/*.png images"
    assert len(asked) == 1 and asked[0] is not None and 0 < asked[0] <= 60


def test_fashion_files_that_disagree_or_are_missing_are_named(tmp_path):
    folder = tmp_path / "fashion"
    folder.mkdir()
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28)), compress=True)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(4))
    with pytest.raises(bm.Error) as e:
        bm.load_fashion(tmp_path, folder)
    assert str(e.value) == (f"{folder / 't10k-images-idx3-ubyte.gz'} has 5 images but "
                            f"{folder / 't10k-labels-idx1-ubyte'} has 4 labels")
    (tmp_path / "images only").mkdir()
    write_idx(tmp_path / "images only" / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28)))  # its labels missing
    for half in ("none", "images only"):
        with pytest.raises(bm.Error) as e:
            bm.load_fashion(tmp_path, tmp_path / half)
        assert str(e.value) == f"Fashion-MNIST test files not found in {tmp_path / half} (--fashion-dir)"
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"")
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b cut short")
    with pytest.raises(bm.Error) as e:
        bm.read_idx(folder / "t10k-images-idx3-ubyte.gz")
    assert str(e.value).startswith(f"cannot read {folder / 't10k-images-idx3-ubyte.gz'}: ")


def test_mnist_files_that_read_well_leave_torchvisions_own_reason(tmp_path):
    make_mnist_dir(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    assert bm.mnist_error(raw, False, RuntimeError("out of memory")) == f"cannot read MNIST in {raw}: out of memory"
    assert bm.mnist_error(raw, False, MemoryError()) == f"cannot read MNIST in {raw}: MemoryError"  # no words: its kind


def test_missing_mnist_files_and_a_failed_download_are_one_sentence_with_the_reason(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    e = RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n<urlopen error [Errno -3] no network>")
    assert bm.mnist_error(raw, True, e) == (
        f"no MNIST file train-images-idx3-ubyte in {raw} and the download failed (urlopen error [Errno -3] "
        f"no network); put the four *-ubyte files there, or point --data-dir at a folder holding MNIST/raw/")


def test_fashion_images_of_another_size_are_named(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 32, 32)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3))
    with pytest.raises(bm.Error) as e:
        bm.load_fashion(tmp_path, tmp_path)
    assert str(e.value) == f"{tmp_path / 't10k-images-idx3-ubyte'} holds images of shape (32, 32), not 28x28"
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(0))
    with pytest.raises(bm.Error) as e:
        bm.load_fashion(tmp_path, tmp_path)
    assert str(e.value) == f"{tmp_path / 't10k-images-idx3-ubyte'} holds no images"
