"""Loading MNIST-format files, image folders, and the promised errors for bad files."""

import numpy as np
import pytest
import torch
from PIL import Image

import bnn_mnist as bm
from conftest import make_mnist_dir, synthetic_digits, write_idx


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    images, _ = synthetic_digits(7)
    path = tmp_path / ("x.gz" if compress else "x")
    write_idx(path, images, compress)
    out = bm.read_idx(path)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (7, 28, 28)
    assert np.array_equal(out.numpy(), images)


def test_read_idx_reads_each_size_as_four_bytes(tmp_path):
    images = np.arange(2 * 1 * 70000).astype(np.uint8).reshape(2, 1, 70000)  # a size past two bytes
    write_idx(tmp_path / "wide", images)
    assert np.array_equal(bm.read_idx(tmp_path / "wide").numpy(), images)


@pytest.mark.parametrize("change, message", [
    (lambda raw: bytes([1]) + raw[1:], "is not an MNIST IDX file of unsigned bytes (wrong magic number)"),
    (lambda raw: raw[:2] + bytes([9]) + raw[3:], "is not an MNIST IDX file of unsigned bytes (wrong magic number)"),
    (lambda raw: raw[:1] + bytes([1]) + raw[2:], "is not an MNIST IDX file of unsigned bytes (wrong magic number)"),
    (lambda raw: raw[:10], "is truncated (header cut short)"),
    (lambda raw: raw + b"\0", "is longer than its header says: 3153 bytes, header promises 3152"),
    (lambda raw: raw[:-1], "is truncated: 3151 bytes, header promises 3152"),
    (lambda raw: bytes([0, 0, 8, 1, 1, 0, 0, 5]) + bytes(5), "is truncated: 13 bytes, header promises 16777229"),
])
def test_each_damaged_idx_header_is_named_for_what_is_wrong(tmp_path, change, message):
    images, _ = synthetic_digits(4)
    write_idx(tmp_path / "x", images)
    (tmp_path / "x").write_bytes(change((tmp_path / "x").read_bytes()))
    with pytest.raises(bm.Error) as e:
        bm.read_idx(tmp_path / "x")
    assert str(e.value) == f"{tmp_path / 'x'} {message}"


def test_an_idx_file_of_no_items_reads_as_an_empty_tensor_of_its_shape(tmp_path):
    write_idx(tmp_path / "none", np.zeros((0, 28, 28), dtype=np.uint8))
    empty = bm.read_idx(tmp_path / "none")
    assert tuple(empty.shape) == (0, 28, 28) and empty.dtype == torch.uint8  # a header alone: 16 bytes, nothing after


def test_load_mnist_shapes_and_range(data_dir):
    x, y = bm.load_mnist(data_dir, train=True)
    xt, yt = bm.load_mnist(data_dir, train=False)
    assert x.shape == (600, 784) and x.dtype == torch.float32 and y.shape == (600,) and y.dtype == torch.int64
    assert xt.shape == (200, 784) and yt.shape == (200,)
    assert 0 <= x.min() and x.max() <= 1 and set(y.tolist()) == set(range(10))
    images, labels = synthetic_digits(600, 0)
    assert torch.equal(x[5], torch.from_numpy(images[5]).float().flatten() / 255)
    assert torch.equal(y, torch.from_numpy(labels).long())


def test_wrong_magic_names_the_file(fresh_data_dir):
    path = fresh_data_dir / "MNIST/raw/train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[2] = 0x0D  # float32 data type instead of unsigned byte
    path.write_bytes(bytes(raw))
    with pytest.raises(bm.Error, match="train-images-idx3-ubyte is not an MNIST IDX file: damaged"):
        bm.load_mnist(fresh_data_dir, train=True)


def test_truncated_file_names_the_file(fresh_data_dir):
    path = fresh_data_dir / "MNIST/raw/t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(bm.Error, match="t10k-images-idx3-ubyte is not an MNIST IDX file: damaged or truncated"):
        bm.load_mnist(fresh_data_dir, train=False)


def test_mismatched_counts_name_both_files(fresh_data_dir):
    _, labels = synthetic_digits(150, 3)
    write_idx(fresh_data_dir / "MNIST/raw/t10k-labels-idx1-ubyte", labels)
    with pytest.raises(bm.Error, match=r"MNIST/raw/t10k-images-idx3-ubyte has 200 images but .*/t10k-labels-idx1-ubyte has 150 labels$"):
        bm.load_mnist(fresh_data_dir, train=False)


@pytest.mark.parametrize("label", [10, 11])  # 10: the first label past 0-9
def test_label_out_of_range(fresh_data_dir, label):
    write_idx(fresh_data_dir / "MNIST/raw/t10k-labels-idx1-ubyte", np.full(200, label))
    with pytest.raises(bm.Error, match=f"label {label}"):
        bm.load_mnist(fresh_data_dir, train=False)


def test_image_folder_and_fashion(tmp_path):
    for letter, value in (("A", 0), ("B", 255)):
        (tmp_path / "letters" / letter).mkdir(parents=True)
        Image.fromarray(np.full((28, 28), value, np.uint8)).save(tmp_path / "letters" / letter / "1.png")
    Image.fromarray(np.full((56, 56), 255, np.uint8)).save(tmp_path / "letters" / "B" / "big.png")
    for suffix in (".jpg", ".JPEG"):  # JPEG files by either name, any case
        Image.fromarray(np.full((28, 28), 255, np.uint8)).save(tmp_path / "letters" / "B" / f"photo{suffix}", "JPEG")
    Image.fromarray(np.full((28, 28, 3), 255, np.uint8)).save(tmp_path / "letters" / "B" / "rgb.png")  # read as gray
    (tmp_path / "letters" / "B" / "notes.txt").write_text("not an image")
    x = bm.load_image_folder(tmp_path / "letters")
    assert x.shape == (6, 784) and x[0].max() == 0 and x[1:].min() == 1
    with pytest.raises(bm.Error, match="no PNG"):
        bm.load_image_folder(tmp_path / "letters" / "nothing")
    (tmp_path / "letters" / "B" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(bm.Error) as e:
        bm.load_image_folder(tmp_path / "letters")
    assert str(e.value).startswith(f"cannot read image {tmp_path / 'letters' / 'B' / 'broken.png'}: cannot identify")

    make_mnist_dir(tmp_path / "f", dataset="FashionMNIST")
    assert bm.load_fashion(tmp_path / "f").shape == (200, 784)
    with pytest.raises(bm.Error, match="Fashion-MNIST test files not found"):
        bm.load_fashion(tmp_path, fashion_dir=tmp_path / "missing")


def test_the_ood_sets_are_read_from_the_data_dir_when_no_folder_of_their_own_is_named(tmp_path):
    make_mnist_dir(tmp_path, dataset="FashionMNIST")
    (tmp_path / "notMNIST-459" / "A").mkdir(parents=True)
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(tmp_path / "notMNIST-459" / "A" / "1.png")
    cfg = bm.Config(data_dir=str(tmp_path), fashion_dir=None, notmnist_dir=None, ood="fashion,notmnist")
    report = {"ood_skipped": {}}
    ood = bm.load_ood_sets(cfg, report)
    assert torch.equal(ood["Fashion-MNIST"], bm.load_fashion(tmp_path, fashion_dir=tmp_path / "FashionMNIST" / "raw"))
    assert ood["notMNIST"].shape == (1, 784) and report["ood_skipped"] == {}
