"""Checkpoints, resume, interruption, divergence, full disks and reproducibility."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import bnn_mnist as bm
from conftest import ROOT, as_from_a_terminal, cli_env

TINY = ["--hidden-size", "16", "--batch-size", "32", "--unc-samples", "10", "--ood", "noise",
        "--noise-count", "50", "--no-plots", "--lr", "0.01", "--val-size", "100"]
TIMING = {"train_seconds", "predict_seconds", "peak_rss_mib"}


def metrics_without_timing(m):
    return {k: v for k, v in m.items() if k not in TIMING}


def guide_params(path):
    return torch.load(path, weights_only=True)["net"]


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_same_everything_and_another_seed_differs(tmp_path, data_dir, capsys):
    t0 = time.perf_counter()
    runs = [bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path / f"r{i}"), "--epochs", "2",
                     "--seed", str(seed), *TINY]) for i, seed in enumerate((7, 7, 8))]
    assert metrics_without_timing(runs[0]) == metrics_without_timing(runs[1])
    assert_same_params(guide_params(tmp_path / "r0/guide.pt"), guide_params(tmp_path / "r1/guide.pt"))
    assert runs[0]["epoch_losses"] != runs[2]["epoch_losses"]
    assert all(r["peak_rss_mib"] > 100 for r in runs)  # torch alone takes more (MiB; null only without `resource`)
    assert all(0 < r["predict_seconds"] < time.perf_counter() - t0 for r in runs)  # within the three runs' time
    assert not any("peak_cuda_mib" in r for r in runs)  # a CPU run's metrics: GPU runs only (docs/usage.md)
    text = (tmp_path / "r0" / "metrics.json").read_text()
    assert text.startswith('{\n  "') and text.endswith("\n}\n")  # indented, a key a line: for a reader and a diff


def test_drawing_the_figures_does_not_change_the_numbers(tmp_path, data_dir, capsys):
    base = ["--data-dir", str(data_dir), "--epochs", "1", "--seed", "3"]
    quiet = bm.main([*base, "--out-dir", str(tmp_path / "a"), *TINY])
    drawn = bm.main([*base, "--out-dir", str(tmp_path / "b"), *[a for a in TINY if a != "--no-plots"]])
    assert (tmp_path / "b/prediction.png").exists() and not (tmp_path / "a/prediction.png").exists()
    assert metrics_without_timing(quiet) == metrics_without_timing(drawn)


def test_three_epochs_then_resume_two_equals_five_straight(tmp_path, data_dir, capsys):
    base = ["--data-dir", str(data_dir), *TINY]
    straight = bm.main([*base, "--out-dir", str(tmp_path / "a"), "--epochs", "5"])
    bm.main([*base, "--out-dir", str(tmp_path / "b"), "--epochs", "3"])
    capsys.readouterr()
    resumed = bm.main([*base, "--out-dir", str(tmp_path / "b"), "--epochs", "5", "--resume"])
    out = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'b/checkpoint.pt'}: epoch 3" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == ["4/5", "5/5"]  # no more
    assert metrics_without_timing(straight) == metrics_without_timing(resumed)
    assert_same_params(guide_params(tmp_path / "a/guide.pt"), guide_params(tmp_path / "b/guide.pt"))


def start_long_run(out, data_dir):
    cmd = [sys.executable, str(ROOT / "bnn_mnist.py"), "--data-dir", str(data_dir), "--out-dir", str(out),
           "--epochs", "400", "--batch-size", "8", *TINY[:2], *TINY[4:]]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                            preexec_fn=as_from_a_terminal)


def wait_for_checkpoint(out, proc, min_epoch=2, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        if (out / "checkpoint.pt").exists() and bm.load_checkpoint(out / "checkpoint.pt")["epoch"] >= min_epoch:
            return
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_killed_run_resumes_to_the_same_result(tmp_path, data_dir, how):
    out = tmp_path / "run"
    proc = start_long_run(out, data_dir)
    wait_for_checkpoint(out, proc)
    time.sleep(0.1)  # somewhere inside an epoch
    proc.send_signal(getattr(signal, how))
    _, stderr = proc.communicate(timeout=60)
    ckpt = bm.load_checkpoint(out / "checkpoint.pt")  # loadable whatever the signal
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL and ckpt["step"] == 0  # the last end-of-epoch checkpoint
    else:
        assert proc.returncode == 128 + getattr(signal, how)
        assert "interrupted at epoch" in stderr and "run again with --resume" in stderr
        assert ckpt["step"] > 0  # written at the interruption, not only at the last epoch's end
    # Finish two more epochs than were complete, and compare with a straight run of as many.
    epochs = ckpt["epoch"] + 2
    argv = ["--data-dir", str(data_dir), "--epochs", str(epochs), "--batch-size", "8", *TINY[:2], *TINY[4:]]
    resumed = bm.main([*argv, "--out-dir", str(out), "--resume"])
    assert not list(out.glob("*.tmp"))  # none left, even by a kill in the middle of a write
    straight = bm.main([*argv, "--out-dir", str(tmp_path / "straight")])
    assert metrics_without_timing(resumed) == metrics_without_timing(straight)
    assert_same_params(guide_params(out / "guide.pt"), guide_params(tmp_path / "straight/guide.pt"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, small_data):
    x, y, _, _ = small_data
    ckpt = tmp_path / "checkpoint.pt"
    kw = dict(batch_size=64, lr=1e-2, progress=False, log=lambda *a: None, checkpoint_path=ckpt)
    bm.train(bm.BNN(784, 16, 10), x, y, epochs=1, **kw)
    good = ckpt.read_bytes()
    state = bm.load_checkpoint(ckpt)
    state["net"]["loc.out_bias"][3] = float("nan")
    with pytest.raises(bm.Error, match="loss became nan at epoch 2 step 1.*last good checkpoint kept"):
        bm.train(bm.BNN(784, 16, 10), x, y, epochs=2, resume_state=state, **kw)
    assert ckpt.read_bytes() == good


def test_training_time_is_counted_across_a_resume(tmp_path, small_data):
    """train_seconds (metrics.json's) is the whole training's, the part before an interruption included."""
    x, y, _, _ = small_data
    kw = dict(batch_size=64, progress=False, log=lambda *a: None)
    t0 = time.perf_counter()
    first = bm.train(bm.BNN(784, 16, 10), x, y, epochs=1, checkpoint_path=tmp_path / "c.pt", **kw)
    assert first["train_seconds"] <= time.perf_counter() - t0  # a fresh run's clock starts at 0
    saved = bm.load_checkpoint(tmp_path / "c.pt")
    assert 0 < saved["train_seconds"] <= first["train_seconds"]
    resumed = bm.train(bm.BNN(784, 16, 10), x, y, epochs=2, resume_state=saved, **kw)
    assert resumed["train_seconds"] > saved["train_seconds"]


def test_a_checkpoint_for_another_net_is_named_when_training_resumes_from_it(tmp_path, small_data):
    """train(net, ..., resume_state=bm.load_checkpoint(path)) in a notebook, with a net of another size."""
    x, y, _, _ = small_data
    kw = dict(batch_size=64, progress=False, log=lambda *a: None)
    bm.train(bm.BNN(784, 16, 10), x, y, epochs=1, checkpoint_path=tmp_path / "c.pt", **kw)
    with pytest.raises(bm.Error) as e:
        bm.train(bm.BNN(784, 8, 10), x, y, epochs=2, resume_state=bm.load_checkpoint(tmp_path / "c.pt"), **kw)
    assert str(e.value) == ("the checkpoint holds loc.fc1_bias of shape (16,), but this BNN needs (8,) "
                            "(a different --hidden-size?)")


def test_a_signal_at_a_step_that_left_a_parameter_non_finite_keeps_the_last_good_checkpoint(tmp_path, small_data,
                                                                                         monkeypatch):
    """The loss of a step is computed before its update: a finite loss, then a NaN parameter, then Ctrl-C."""
    x, y, _, _ = small_data
    ckpt, epoch = tmp_path / "checkpoint.pt", bm.train_epoch
    kw = dict(batch_size=64, progress=False, log=lambda *a: None, checkpoint_path=ckpt)
    net = bm.BNN(784, 16, 10)
    bm.train(net, x, y, epochs=1, **kw)
    good = ckpt.read_bytes()

    def nan_at_first_step(svi, x, y, batch_size, state, steps, after_step, kl_per_batch):
        def after(state, loss):
            with torch.no_grad():
                net.loc["out_bias"][0] = float("nan")
            after_step(state, loss)
        return epoch(svi, x, y, batch_size, state, steps, after, kl_per_batch)

    monkeypatch.setattr(bm, "train_epoch", nan_at_first_step)
    with pytest.raises(bm.Error) as e:
        bm.train(net, x, y, epochs=2, resume_state=bm.load_checkpoint(ckpt), stop_requested=lambda: 2, **kw)
    assert str(e.value) == "a parameter became non-finite (interrupted; last good checkpoint kept)"
    assert ckpt.read_bytes() == good


def test_diverging_cli_run_exits_with_one_line(tmp_path, data_dir):
    r = subprocess.run([sys.executable, str(ROOT / "bnn_mnist.py"), "--data-dir", str(data_dir),
                        "--out-dir", str(tmp_path), "--epochs", "2", "--lr", "1e30", *TINY[:4], "--val-size", "100"],
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: loss became") and "at epoch 1 step" in lines[0]


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    argv = ["--data-dir", str(data_dir), "--out-dir", str(tmp_path), *TINY]
    bm.main([*argv, "--epochs", "1"])
    good = (tmp_path / "checkpoint.pt").read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bm.torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        bm.main([*argv, "--epochs", "2", "--resume"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: could not save {tmp_path / 'checkpoint.pt'}: No space left on device "
                   f"(the previous file is kept)"]
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert not list(tmp_path.glob("*.tmp"))


def test_leftover_temporary_files_are_removed(tmp_path, data_dir, capsys):
    (tmp_path / "checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.txt.tmp").write_text("not ours")
    bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", *TINY])
    assert sorted(p.name for p in tmp_path.glob("*.tmp")) == ["notes.txt.tmp"]


def test_resume_refuses_other_settings_and_formats(tmp_path, data_dir, capsys):
    argv = ["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", *TINY]
    with pytest.raises(SystemExit):
        bm.main([*argv, "--resume"])
    assert f"--resume: no checkpoint at {tmp_path / 'checkpoint.pt'}" in capsys.readouterr().err
    bm.main(argv)
    with pytest.raises(SystemExit):
        bm.main([*argv, "--resume", "--hidden-size", "24"])
    err = capsys.readouterr().err  # names the checkpoint that does not fit
    assert f"error: {tmp_path / 'checkpoint.pt'} holds " in err
    assert "of shape (16,), but this BNN needs (24,) (a different --hidden-size?)" in err
    with pytest.raises(SystemExit):
        bm.main([*argv, "--resume", "--lr", "0.02", "--batch-size", "16"])
    assert "was made with other settings (batch_size 32 -> 16, lr 0.01 -> 0.02)" in capsys.readouterr().err
    bm.main(argv)  # again, without --resume: says what happens to the old checkpoint
    assert (f"note: starting afresh; {tmp_path / 'checkpoint.pt'} from an earlier run will be replaced "
            f"(--resume continues it instead)") in capsys.readouterr().out
    obj = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    obj["format"] = "bnn_mnist-checkpoint-0"
    torch.save(obj, tmp_path / "checkpoint.pt")
    with pytest.raises(SystemExit):
        bm.main([*argv, "--resume"])
    assert "has format 'bnn_mnist-checkpoint-0', expected 'bnn_mnist-checkpoint-2'" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 1


def test_a_signal_while_the_last_checkpoint_is_written_stops_the_run_before_its_report(tmp_path, data_dir,
                                                                                     monkeypatch, capsys):
    """Training is over and saved, but the user asked to stop: exit 143, saying so, with no report."""
    import signal

    train = bm.train

    def then_a_signal(*a, **k):
        result = train(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)  # as if it came during the final checkpoint's write
        return result

    monkeypatch.setattr(bm, "train", then_a_signal)
    with pytest.raises(SystemExit) as e:
        bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", *TINY])
    assert e.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.startswith("interrupted after epoch 1;")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "metrics.json").exists()


def test_a_signal_during_training_stops_it_after_the_step_with_a_checkpoint(tmp_path, data_dir, monkeypatch, capsys,
                                                                             progress_bars):
    """SIGTERM in the middle of a run (here: after the first epoch) ends training at once, saved, exit 143."""
    import signal

    epoch = bm.train_epoch

    def then_a_signal(*a, **k):
        result = epoch(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's handler, which only sets a flag
        return result

    monkeypatch.setattr(bm, "train_epoch", then_a_signal)
    with pytest.raises(SystemExit) as e:
        bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "3", *TINY])
    assert e.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.startswith("interrupted at epoch 2 step 1;")  # the step under way, then stop
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 1)
    monkeypatch.setattr(bm, "train_epoch", epoch)
    before = len(progress_bars)
    bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "3", "--resume", *TINY])
    first = progress_bars[before]["kwargs"]  # resumed mid-epoch, the bar starts at the step reached
    assert (first["desc"], first.get("initial", 0)) == ("epoch 2/3", 1)


def test_the_run_starts_from_the_init_asked_and_fits_its_rule_with_the_sampler_asked(tmp_path, data_dir, monkeypatch):
    import inspect

    asked = {"refusal_rule": [], "sample_probs_sets": []}  # the rule's fit and the report's samples
    for name in asked:
        real = getattr(bm, name)
        monkeypatch.setattr(bm, name, lambda *a, real=real, seen=asked[name], **k:
                            seen.append(inspect.signature(real).bind(*a, **k).arguments.get("sampler", "local"))
                            or real(*a, **k))
    argv = ["--data-dir", str(data_dir), "--epochs", "1", "--max-batches", "1", *TINY]
    m = bm.main([*argv, "--out-dir", str(tmp_path / "a"), "--init", "article", "--sampler", "weights"])
    bm.main([*argv, "--out-dir", str(tmp_path / "b")])
    assert asked == {"refusal_rule": ["weights", "local"], "sample_probs_sets": ["weights", "local"]}
    assert m["sampler"] == "weights"  # and metrics.json says so
    article, torch_init = (bm.load_guide(tmp_path / d / "guide.pt").loc["fc1_weight"].std() for d in "ab")
    assert article > 0.5 and torch_init < 0.1  # randn (std 1) against PyTorch's 1/sqrt(784)-wide uniform
