"""Safe loading, portability, bounded memory, devices, file modes and error handling."""

import json
import os
import pickle
import stat
import subprocess
import sys

import pyro
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bnn_mnist as bm
from conftest import TINY, ROOT, cli_env, ready_net



class Evil:
    """Unpickling this makes a folder: what a booby-trapped guide could do (or worse)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("torch_default", ["installed", "before 2.6"])
def test_a_malicious_guide_runs_nothing(tmp_path, monkeypatch, torch_default):
    if torch_default == "before 2.6":  # torch.load unpickled anything unless told weights_only=True: the loader must
        real = torch.load  # None, or no weights_only at all, meant False

        def old_load(*args, weights_only=None, **kwargs):
            return real(*args, weights_only=bool(weights_only), **kwargs)
        monkeypatch.setattr(torch, "load", old_load)
    marker = tmp_path / "pwned"
    for name, fmt in (("guide.pt", bm.GUIDE_FORMAT), ("checkpoint.pt", bm.CHECKPOINT_FORMAT)):
        torch.save({"format": fmt, "payload": Evil(marker)}, tmp_path / name)
        pickle.loads(pickle.dumps(Evil(tmp_path / f"control-{name}")))  # the trap is real: unpickling runs it
        assert (tmp_path / f"control-{name}").exists()
        loader = bm.load_guide if name == "guide.pt" else bm.load_checkpoint
        with pytest.raises(bm.Error, match=f"{name} is not a readable bnn_mnist file"):
            loader(tmp_path / name)
        assert not marker.exists()


def test_saved_files_load_with_weights_only_and_round_trip(tmp_path, data_dir, capsys):
    bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", *TINY])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # optimizer and RNG state included
    assert ckpt["optim"] and ckpt["rng"].dtype == torch.uint8 and ckpt["cuda_rng"] is None
    net = bm.load_guide(tmp_path / "guide.pt")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert net.rule == metrics["rule"] and set(net.rule) == {"mutual_information", "expected_entropy"}
    assert metrics["threshold"] == net.rule["mutual_information"] > 0


def test_outputs_get_the_mode_the_umask_gives(tmp_path, data_dir, capsys):
    old = os.umask(0o022)
    try:
        bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path / "a"), "--epochs", "1",
                 *[a for a in TINY if a != "--no-plots"]])
        os.umask(0o077)
        bm.write_json({"x": 1}, tmp_path / "private.json")
    finally:
        os.umask(old)
    for f in (tmp_path / "a").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert {f.name for f in (tmp_path / "a").iterdir()} >= {"guide.pt", "metrics.json", "examples.png"}
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


def test_imports_and_saves_without_resource_or_directory_fsync(tmp_path):
    code = (  # Windows has no `resource` module and cannot open a folder
        "import sys, os; sys.modules['resource'] = None\n"
        "real_open = os.open\n"
        "def no_dirs(path, flags, *a):\n"
        "    if os.path.isdir(path): raise PermissionError(13, 'Permission denied', path)\n"
        "    return real_open(path, flags, *a)\n"
        "os.open = no_dirs\n"
        "import bnn_mnist as bm\n"
        f"bm.write_json({{'ok': 1}}, {str(tmp_path / 'm.json')!r})\n"
        "print(bm.peak_rss_mib(), open(" + repr(str(tmp_path / "m.json")) + ").read().strip())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=cli_env() | {"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(None, 1) == ["None", '{\n  "ok": 1\n}\n']


def test_peak_memory_units_on_linux_and_macos(monkeypatch):
    import resource

    class Usage:
        ru_maxrss = 3 * 2**20

    monkeypatch.setattr(resource, "getrusage", lambda who: Usage)
    monkeypatch.setattr(sys, "platform", "linux")
    assert bm.peak_rss_mib() == 3 * 1024  # KiB on Linux
    monkeypatch.setattr(sys, "platform", "darwin")
    assert bm.peak_rss_mib() == 3  # bytes on macOS


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any operation creates (views of existing storage excluded)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("num_samples, batch", [(500, 1), (100, 50), (3, 400)])
def test_sample_probs_bounds_weights_and_activations(num_samples, batch):
    net = ready_net(16, init_scale=0.1)
    weight_set = 16 * 784 + 16 + 10 * 16 + 10
    bound = 3 * weight_set
    x = torch.rand(batch, 784)
    with LargestAllocation() as mode:
        probs = bm.sample_probs(x, net, num_samples, max_elements=bound)
    result = num_samples * batch * 10  # the (S, B, 10) answer itself, and checks of the input x
    assert probs.shape == (num_samples, batch, 10)
    assert mode.largest <= max(bound, result, x.numel()), (mode.largest, bound)
    with LargestAllocation() as unbounded:
        bm.sample_probs(x, net, num_samples, max_elements=10**12)
    assert unbounded.largest > bound or num_samples * weight_set <= bound  # the test can see a breach


def test_library_functions_make_nothing_on_the_default_device():
    """With the default device set to `meta`, any tensor made without device= lands there and
    mixing it with the CPU inputs fails: this finds CPU/device mixing without a GPU."""
    net = ready_net(16, init_scale=0.1)
    x, y = torch.rand(40, 784), torch.randint(0, 10, (40,))
    with torch.device("meta"):
        probs = bm.sample_probs(x, net, 5)
        u = bm.uncertainty(probs)["mutual_information"]
        correct = probs.mean(0).argmax(1) == y
        results = [probs, u, *bm.accuracy_coverage_curve(u, correct), *bm.calibration_bins(probs.mean(0), y),
                   bm.predict_or_abstain(x, net, {"mutual_information": 0.1}), bm.pyro_predictive_prob(x[:3], net, 4)]
        numbers = [bm.auroc(u[:20], u[20:]), bm.evaluate(probs.mean(0), y)["ece"],
                   bm.abstention(u > 0.1, correct)["coverage"], *bm.refusal_rule(x, net, num_samples=4).values()]
    assert all(t.device.type == "cpu" for t in results)
    assert all(isinstance(v, float) for v in numbers)


def test_resume_with_fewer_epochs_or_on_another_device_is_refused(tmp_path, data_dir, capsys):
    argv = ["--data-dir", str(data_dir), "--out-dir", str(tmp_path), *TINY]
    bm.main([*argv, "--epochs", "3"])
    with pytest.raises(SystemExit):
        bm.main([*argv, "--epochs", "2", "--resume"])
    assert "has already trained 3 epochs; --epochs 2 cannot undo that" in capsys.readouterr().err
    (tmp_path / "metrics.json").unlink()
    bm.main([*argv, "--epochs", "3", "--resume"])  # as many as it has: nothing to train, the report again
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 3
    obj = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    obj["settings"]["device"] = "cuda"
    torch.save(obj, tmp_path / "checkpoint.pt")
    with pytest.raises(SystemExit):
        bm.main([*argv, "--epochs", "4", "--resume"])
    assert "was made with other settings (device cuda -> cpu)" in capsys.readouterr().err


def test_device_cpu_stays_on_the_cpu_on_a_machine_with_a_gpu(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the choice can tell
    bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", "--device", "cpu", *TINY])
    assert json.loads((tmp_path / "metrics.json").read_text())["device"] == "cpu"


def test_a_bug_keeps_its_traceback_but_a_users_mistake_is_one_line(tmp_path, data_dir, monkeypatch, capsys):
    def broken(*a, **k):
        raise ValueError("an internal bug")

    monkeypatch.setattr(bm, "evaluate", broken)
    with pytest.raises(ValueError, match="an internal bug"):  # not swallowed into "error: ..."
        bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", *TINY])
    with pytest.raises(SystemExit) as e:
        bm.main(["--data-dir", str(tmp_path / "nothing"), "--out-dir", str(tmp_path)])
    assert e.value.code == 1 and capsys.readouterr().err.startswith("error: no MNIST file")


# -----------------------------------------------------------------------------
# The memory bound holds at the sizes a user runs, not only at toy sizes


@pytest.mark.parametrize("num_samples, batch", [(10, 10000), (100, 10000), (1000, 1), (3, 5)])
def test_the_default_bound_holds_for_the_default_network(num_samples, batch):
    net = bm.BNN()  # 784-1024-10: 814,090 weights a set
    weight_set, hidden = sum(p.numel() for p in net.loc.values()), net.sizes[1]
    s, b = bm.chunk_sizes(net, num_samples, batch, 2**25)
    assert isinstance(s, int) and isinstance(b, int)  # counts of weight sets and images
    assert s * weight_set <= 2**25 and s * min(b, batch) * hidden <= 2**25  # 128 MiB of floats each
    assert s >= 1 and b >= 1 and (s == num_samples or s * weight_set * 2 > 2**25 or s * min(b, batch) * hidden * 2 > 2**25)


def test_sampling_a_default_network_allocates_within_the_bound():
    net = bm.BNN(init_scale=0.05)
    net.trained.fill_(True)
    x = torch.rand(3000, 784)
    with LargestAllocation() as mode:
        probs = bm.sample_probs(x, net, 12)  # max_elements at its default, 2**25
    assert probs.shape == (12, 3000, 10) and mode.largest <= 2**25
    with LargestAllocation() as unbounded:
        bm.sample_probs(x, net, 12, max_elements=2**40)
    assert unbounded.largest > 2**25  # unbounded, the same call would breach it: the bound is doing the work


# -----------------------------------------------------------------------------
# Each loader handed the other file the project writes: one line saying which is which


def test_a_guide_and_a_checkpoint_are_never_taken_for_each_other(tmp_path, data_dir, capsys):
    from conftest import TINY

    bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", "--max-batches", "2", *TINY])
    guide, checkpoint = tmp_path / "guide.pt", tmp_path / "checkpoint.pt"
    with pytest.raises(bm.Error, match="checkpoint.pt has format 'bnn_mnist-checkpoint-2', expected 'bnn_mnist-guide-2'"):
        bm.load_guide(checkpoint)
    with pytest.raises(bm.Error, match="guide.pt has format 'bnn_mnist-guide-2', expected 'bnn_mnist-checkpoint-2'"):
        bm.load_checkpoint(guide)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        bm.main(["predict", "--guide", str(checkpoint), str(guide)])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {checkpoint} has format 'bnn_mnist-checkpoint-2', expected 'bnn_mnist-guide-2'"]
    guide.replace(checkpoint)  # a guide where --resume expects its checkpoint
    with pytest.raises(SystemExit) as e:
        bm.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--epochs", "1", "--resume", *TINY])
    assert e.value.code == 1 and "expected 'bnn_mnist-checkpoint-2'" in capsys.readouterr().err


def test_saving_into_a_folder_that_is_not_there_is_one_clear_error(tmp_path):
    net = ready_net(8)
    with pytest.raises(bm.Error, match=r"could not save .*missing.*g\.pt: No such file or directory \(the previous file is kept\)"):
        bm.save_guide(tmp_path / "missing" / "g.pt", net)


def test_the_per_image_sampler_keeps_its_noise_pool_within_16_mib_at_the_default_size():
    net = bm.BNN(init_scale=0.05)  # H = 1024
    net.trained.fill_(True)
    S, B, H = 100, 5000, 1024
    with LargestAllocation() as mode:
        probs = bm.sample_probs_local(torch.rand(B, 784), net, S)
    assert probs.shape == (S, B, 10)
    # the answer (S, B, 10), each image's mean and std (B, H), and the pool: at most 2**22 floats past S rows
    assert mode.largest <= max(S * B * 10, B * H, (S + 2**22 // H) * H)


def test_room_for_one_weight_set_is_one_weight_set_at_a_time():
    net = bm.BNN(784, 16, 10)
    weight_set = sum(p.numel() for p in net.loc.values())
    for bound in (weight_set, 2 * weight_set - 1):
        assert bm.chunk_sizes(net, 10, 5, bound)[0] == 1


def test_everything_that_takes_images_follows_the_net_to_its_device(monkeypatch):
    """net.to(device), then images on the CPU: net(x), weight-set sampling and the per-image sampler all
    compute where the posterior lives (the meta device stands in for a GPU on a machine without one;
    Pyro's argument checks read values, which meta has not, so they are off for the weight sets)."""
    net = bm.BNN(784, 8, 10).to("meta")
    net.trained = torch.tensor(True)  # the flag stays readable on the CPU
    x = torch.rand(3, 784)
    out = net(x)
    assert out.device.type == "meta" and out.shape == (3, 10)
    seen = []  # meta mixes with CPU tensors where a GPU would not: look at the images the forward pass gets
    forward = bm.bnn_forward
    monkeypatch.setattr(bm, "bnn_forward", lambda w, images: seen.append(images.device.type) or forward(w, images))
    with pyro.validation_enabled(False):
        weight_sets = bm.sample_probs(x, net, 2)
    assert seen == ["meta"]
    for probs in (weight_sets, bm.sample_probs_local(x, net, 2)):
        assert probs.device.type == "meta" and probs.shape == (2, 3, 10)


def test_files_load_onto_the_device_asked_for_and_a_gpu_checkpoint_keeps_its_cuda_rng(tmp_path):
    """load_guide(path, device) puts the posterior there (meta stands in for a GPU); a checkpoint written
    on a GPU carries the CUDA generator's state, handed back as the CPU byte tensor CUDA wants."""
    net = ready_net(8)
    bm.save_guide(tmp_path / "guide.pt", net, rule={"mutual_information": 0.1})
    there = bm.load_guide(tmp_path / "guide.pt", device="meta")
    assert there.device.type == "meta" and all(p.device.type == "meta" for p in there.parameters())
    svi, optim = bm.make_svi(net, lr=1e-3)
    bm.save_checkpoint(tmp_path / "ckpt.pt", {}, net, optim, {"epoch": 1})
    obj = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    obj["cuda_rng"] = torch.arange(16, dtype=torch.uint8)  # as torch.cuda.get_rng_state() gives it
    torch.save(obj, tmp_path / "ckpt.pt")
    back = bm.load_checkpoint(tmp_path / "ckpt.pt")
    assert torch.equal(back["cuda_rng"], obj["cuda_rng"]) and back["cuda_rng"].device.type == "cpu"


def test_an_out_dir_several_folders_deep_is_made_whole(tmp_path):
    out = bm.prepare_out_dir(tmp_path / "runs" / "2026" / "seed0")
    assert out.is_dir() and list(out.iterdir()) == []  # the write probe is gone too
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(bm.Error) as e:
        bm.prepare_out_dir(tmp_path / "a_file" / "out")
    assert str(e.value) == f"cannot write to --out-dir {tmp_path / 'a_file' / 'out'}: Not a directory"


@pytest.mark.parametrize("failure, said", [
    (EOFError(), "EOFError: EOFError"),  # as pickle does on a file cut short: no message, so its kind
    (RuntimeError("  PytorchStreamReader failed reading zip archive\nsecond line"),
     "RuntimeError: PytorchStreamReader failed reading zip archive"),  # a long message: its first line
])
def test_a_reader_failing_is_named_by_its_first_line_or_its_kind(tmp_path, monkeypatch, failure, said):
    (tmp_path / "guide.pt").write_bytes(b"cut short")

    def failing(*a, **k):
        raise failure

    monkeypatch.setattr(bm.torch, "load", failing)
    with pytest.raises(bm.Error) as e:
        bm.load_guide(tmp_path / "guide.pt")
    assert str(e.value) == f"{tmp_path / 'guide.pt'} is not a readable bnn_mnist file ({said})"


def test_a_torch_file_that_is_not_ours_says_what_it_holds(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")  # loads with weights_only, but is no guide
    with pytest.raises(bm.Error) as e:
        bm.load_guide(tmp_path / "list.pt")
    assert str(e.value) == f"{tmp_path / 'list.pt'} has format 'list', expected '{bm.GUIDE_FORMAT}'"
