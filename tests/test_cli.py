"""The command line, end to end in subprocesses, and its promised errors."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import bnn_mnist as bm
from conftest import ROOT, SMALL, cli_env, make_mnist_dir

SCRIPT = str(ROOT / "bnn_mnist.py")
FIGURES = ["prediction.png", "reliability.png", "coverage.png", "uncertainty_hist.png", "examples.png", "shift.png",
           "posterior_scale.png"]  # the README's "seven figures"


def run_cli(*args, cwd=None, timeout=240):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          env=cli_env(), cwd=cwd, timeout=timeout)


def letters(folder):
    rng = np.random.default_rng(0)
    for letter in "AB":
        (folder / letter).mkdir(parents=True, exist_ok=True)
        for i in range(5):
            Image.fromarray((rng.random((28, 28)) > 0.5).astype(np.uint8) * 255).save(folder / letter / f"{i}.png")
    return folder


def test_end_to_end_writes_everything(tmp_path, data_dir):
    out = tmp_path / "out"
    fashion = make_mnist_dir(tmp_path / "fashion", n_train=10, n_test=50, dataset="FashionMNIST")
    r = run_cli("--data-dir", data_dir, "--out-dir", out, "--epochs", 3, "--lr", "0.01", *SMALL,
                "--fashion-dir", fashion / "FashionMNIST/raw", "--notmnist-dir", letters(tmp_path / "letters"))
    assert r.returncode == 0, r.stderr
    assert "epoch 3/3  loss" in r.stdout and "test accuracy" in r.stdout and "AUROC MNIST vs noise" in r.stdout
    for name in ["metrics.json", "guide.pt", "checkpoint.pt", *FIGURES]:
        assert (out / name).stat().st_size > 0, name
    for name in FIGURES:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_accuracy"] > 0.9 and 0 < m["test_nll"] < 1  # separable synthetic digits
    assert m["epochs"] == 3 and len(m["epoch_losses"]) == 3
    assert 0 < m["train_seconds"] < 120 and 0 < m["predict_seconds"] < 60
    assert set(m["calibration"]) == {"accuracy", "nll", "brier", "ece"}
    assert set(m["auroc"]) == {"Fashion-MNIST", "notMNIST", "noise"}
    # known orderings: uniform noise and the letters are far more uncertain than the digits; the
    # "Fashion-MNIST" stand-in here is more synthetic digits, so it is told apart by chance only
    for name in ("noise", "notMNIST"):
        assert set(m["auroc"][name]) == set(bm.MEASURES) and min(m["auroc"][name].values()) > 0.95, name
    assert all(0.3 < v < 0.7 for v in m["auroc"]["Fashion-MNIST"].values()), m["auroc"]["Fashion-MNIST"]
    assert set(m["abstention"]) == {"MNIST", "Fashion-MNIST", "notMNIST", "noise"}
    a = m["abstention"]
    assert a["MNIST"]["refused"] <= 0.15 and a["noise"]["refused"] > 0.9 and a["notMNIST"]["refused"] > 0.9
    assert a["MNIST"]["coverage"] == pytest.approx(1 - a["MNIST"]["refused"]) and m["measure"] == bm.DEFAULTS.measure
    assert m["peak_rss_mib"] > 0 and m["ood_skipped"] == {}
    # the saved guide holds the rule that was applied, and its threshold is the one reported
    assert bm.load_guide(out / "guide.pt").rule == m["rule"] and m["threshold"] == m["rule"][m["measure"]]
    op = m["at_article_operating_point"]  # 12.5% of the test digits refused by construction
    assert set(op) == {"MNIST", "Fashion-MNIST", "notMNIST", "noise"} and op["MNIST"] == 0.125
    assert op["noise"] > 0.9 and op["notMNIST"] > 0.9 and 0.0 < op["Fashion-MNIST"] < 0.3
    assert "refusing 12.5% of MNIST test as the article did: Fashion-MNIST refused" in r.stdout


def test_import_is_silent_and_light(tmp_path):
    code = ("import sys, time; t = time.time(); import bnn_mnist; "
            "print(round(time.time() - t, 2), [m for m in ('torchvision', 'matplotlib', 'seaborn', 'PIL') "
            "if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env=cli_env() | {"PYTHONPATH": str(ROOT)}, timeout=60)
    seconds, heavy = r.stdout.split(" ", 1)
    assert r.returncode == 0 and r.stderr == "" and heavy.strip() == "[]"
    assert float(seconds) < 10
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or written


def test_no_data_and_no_network_fails_fast_with_one_line(tmp_path):
    t0 = time.time()
    r = run_cli("--data-dir", tmp_path / "empty", "--out-dir", tmp_path / "out")
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "no MNIST file train-images-idx3-ubyte in" in lines[0] and str(tmp_path / "empty") in lines[0]
    assert "--data-dir" in lines[0]
    assert time.time() - t0 < 60


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "argument --epochs: must be > 0, got 0"),
    (["--batch-size", "-3"], "argument --batch-size: must be > 0, got -3"),
    (["--num-samples", "0"], "argument --num-samples: must be > 0"),
    (["--epochs", "two"], "argument --epochs: not an integer: 'two'"),
    (["--lr", "nan"], "argument --lr: must be > 0, got nan"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--sampler", "gibbs"], "argument --sampler: invalid choice: 'gibbs'"),
    (["--init", "xavier"], "argument --init: invalid choice: 'xavier'"),
    (["--average", "mean"], "argument --average: invalid choice: 'mean'"),
    (["--measure", "vibes"], "argument --measure: invalid choice: 'vibes'"),
    (["--selective-measure", "vibes"], "argument --selective-measure: invalid choice: 'vibes'"),
    (["--threshold", "5"], "argument --threshold: mutual_information lies in [0, 2.303], got 5"),
    (["--measure", "max_prob", "--threshold", "-0.1"], "argument --threshold: max_prob lies in [0, 0.9]"),
    (["--ood", "cifar"], "argument --ood: unknown set(s) cifar"),
])
def test_bad_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        bm.parse_args(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: bnn_mnist.py") and message in err


def test_each_device_and_average_named_in_help_is_accepted():
    assert [bm.parse_args(["--device", d]).device for d in ("auto", "cpu")] == ["auto", "cpu"]
    assert [bm.parse_args(["--average", a]).average for a in ("probs", "logits")] == ["probs", "logits"]


def test_bad_flag_through_the_real_cli_and_absent_cuda(capsys, monkeypatch):
    r = run_cli("--epochs", "0")
    assert r.returncode == 2 and "usage: bnn_mnist.py" in r.stderr and "--epochs: must be > 0" in r.stderr
    monkeypatch.setattr(bm.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bm.parse_args(["--device", "cuda"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("bnn_mnist.py: error: argument --device: cuda was asked for "
                                                        "but no CUDA device is available")


def test_corrupt_data_file_names_the_file(tmp_path, fresh_data_dir):
    path = fresh_data_dir / "MNIST/raw/train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:50])
    r = run_cli("--data-dir", fresh_data_dir, "--out-dir", tmp_path / "out", "--epochs", 1)
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {path} is not an MNIST IDX file: damaged or truncated")


def test_missing_ood_sets_are_skipped_with_one_line_each(tmp_path, data_dir, capsys):
    out = tmp_path / "out"  # in-process, as a notebook runs it
    bm.main(list(map(str, ["--data-dir", data_dir, "--out-dir", out, "--epochs", 1, *SMALL, "--no-plots",
                           "--ood", "fashion,notmnist", "--fashion-dir", tmp_path / "nope",
                           "--notmnist-dir", tmp_path / "no"])))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "Fashion-MNIST test files not found" in warnings[0]
    m = json.loads((out / "metrics.json").read_text())
    assert warnings[0] == f"warning: skipping OOD set fashion: {m['ood_skipped']['fashion']}"  # the reason kept
    assert set(m["ood_skipped"]) == {"fashion", "notmnist"} and m["auroc"] == {}
    assert "MNIST" in m["abstention"] and m["test_accuracy"] > 0
    assert not list(out.glob("*.png"))  # --no-plots


def test_a_run_holding_nothing_out_refuses_by_the_threshold_given(tmp_path, data_dir, capsys):
    """--val-size 0 trains on every image: no held-out digits to set a threshold from, so it is given."""
    m = bm.main(list(map(str, ["--data-dir", data_dir, "--out-dir", tmp_path, "--epochs", 1, *SMALL, "--no-plots",
                               "--ood", "none", "--val-size", 0, "--threshold", 0.1, "--ambiguity-quantile", 0])))
    assert m["rule"] == {"mutual_information": 0.1} and bm.load_guide(tmp_path / "guide.pt").rule == m["rule"]
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'metrics.json'}"


def test_a_notmnist_folder_given_is_scored_beside_mnist(tmp_path, data_dir, capsys):
    m = bm.main(list(map(str, ["--data-dir", data_dir, "--out-dir", tmp_path / "out", "--epochs", 1, *SMALL,
                               "--no-plots", "--ood", "notmnist", "--notmnist-dir", letters(tmp_path / "letters")])))
    assert m["ood_skipped"] == {} and set(m["auroc"]) == set(m["control_auroc"]) - set(m["near_ood_auroc"]) == {"notMNIST"}
    assert f"AUROC MNIST vs notMNIST: {m['measure']} " in capsys.readouterr().out


def test_out_dir_not_writable(tmp_path, data_dir):
    (tmp_path / "a_file").write_text("x")
    r = run_cli("--data-dir", data_dir, "--out-dir", tmp_path / "a_file" / "out", "--epochs", 1)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: cannot write to --out-dir {tmp_path / 'a_file' / 'out'}: "
                                             f"Not a directory"]


def test_the_recipe_help_prints_for_article_is_a_command_line_for_the_same_run(monkeypatch):
    """A reader copies the flags --help lists for --article: they must parse to what --article sets."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line: argparse wraps long help at hyphens
    text = bm.build_parser().format_help().split("the article's recipe as written: ")[1].split(" (flags given")[0]
    flags = [token for flag in text.split(", ") for token in flag.split()]
    assert len(flags) > 20 and vars(bm.parse_args(flags)) == vars(bm.parse_args(["--article"]))


def test_the_article_with_its_kl_weight_named_takes_the_whole_data_sets_kl():
    cfg = bm.parse_args(["--article", "--kl-weight", "0.5"])  # a weight on the whole KL, not per minibatch
    assert cfg.kl_per_batch is False and cfg.kl_weight == 0.5


def test_main_without_a_list_reads_the_command_line(monkeypatch, capsys):
    """`python bnn_mnist.py ...` calls main(): the words after the script's name are its arguments."""
    monkeypatch.setattr(sys, "argv", ["bnn_mnist.py", "predict", "--help"])
    with pytest.raises(SystemExit) as e:
        bm.main()
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: bnn_mnist.py predict ")
