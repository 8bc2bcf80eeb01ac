"""A Bayesian neural network on MNIST with Pyro: the 2018 tutorial, working and correct.

A 784-1024-10 ReLU network whose weights all have Normal(0, 1) priors, a mean-field
Normal guide whose scales go through softplus, fitted by SVI; predictions average the
class probabilities of posterior samples, and the network says "I don't know" when its
samples disagree.

Full run (MNIST under ./data is downloaded by torchvision when missing):

    python bnn_mnist.py --data-dir data --out-dir out

Smoke run (two capped epochs on a small subset, no out-of-distribution sets):

    python bnn_mnist.py --epochs 2 --max-batches 20 --train-subset 5000 --ood none

From a notebook:

    import bnn_mnist as bm
    net = bm.load_guide("out/guide.pt")            # BNN + the guide's params
    x, y = bm.load_mnist("data", train=False)       # (10000, 784) in [0, 1], (10000,)
    probs = bm.predict_prob(x[:8], net)             # (8, 10), rows sum to 1
    bm.plot(x[0], bm.sample_probs(x[:1], net, 100)[:, 0], label=y[0])

Sections follow the tutorial: settings, data, the BNN, model, guide, training,
prediction, uncertainty ("I don't know"), plots, saving, CLI.

References: Blundell et al. 2015, "Weight Uncertainty in Neural Networks";
the 2018 articles "Tutorial: Bayesian Neural Networks with Pyro" and
"Making your Neural Network Say 'I Don't Know'" (and their translations).
"""

import argparse
import errno
import gzip
import io
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import prune_subsample_sites
from pyro.optim import ClippedAdam

# torchvision, matplotlib, seaborn, tqdm and PIL are imported where they are used, so
# that `import bnn_mnist` stays fast and silent.

# -----------------------------------------------------------------------------
# Settings: every default is written here once; argparse reads them from here.


@dataclass
class Config:
    data_dir: str = "data"  # torchvision layout: DATA_DIR/MNIST/raw/*-ubyte
    out_dir: str = "out"  # every output goes here, with fixed names
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3  # Adam's initial learning rate (chosen by measurement, README)
    lr_decay: float = 0.5  # the learning rate is multiplied by this over each epoch
    scale_lr_factor: float = 1.0  # the guide's scales (rho) learn this many times faster
    hidden_size: int = 1024
    prior_scale: float = 1.0  # the article's Normal(0, 1) prior on every weight
    init_scale: float = 1e-3  # guide scales start small: the net starts near its init
    elbo: str = "meanfield"  # "meanfield": analytic KL; "trace": Monte Carlo KL
    num_samples: int = 10  # posterior samples for the forced prediction (the article)
    unc_samples: int = 100  # posterior samples for uncertainty and abstention
    measure: str = "mutual_information"
    threshold: float | None = None  # None: the measure's default in DEFAULT_THRESHOLDS
    ood: str = "fashion,notmnist,noise"
    fashion_dir: str | None = None  # None: DATA_DIR/FashionMNIST/raw, then Debian's folder
    notmnist_dir: str | None = None  # None: DATA_DIR/notMNIST-459
    noise_count: int = 2000
    seed: int = 0
    device: str = "auto"
    max_batches: int | None = None  # smoke runs: cap the minibatches per epoch
    train_subset: int | None = None  # smoke runs: train on the first N images only
    resume: bool = False
    no_plots: bool = False


DEFAULTS = Config()
CHECKPOINT_FORMAT = "bnn_mnist-checkpoint-1"
GUIDE_FORMAT = "bnn_mnist-guide-1"
CLASSES = 10

# -----------------------------------------------------------------------------
# Data: the IDX files torchvision downloads, read once into tensors.
# The article ran a PIL transform per image per step; one (N, 784) float tensor,
# shuffled by index each epoch, is the same data at a fraction of the cost.

IDX_FILES = {  # split -> (images, labels), torchvision's names
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


class DataError(Exception):
    """A data file is missing, truncated or malformed (the message names it)."""


def read_idx(path):
    """Read one IDX file (optionally .gz) into a uint8 tensor, checking its header."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] not in (1, 3):
        raise DataError(f"{path} is not an MNIST IDX file of unsigned bytes (wrong magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated (header cut short)")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + math.prod(shape)
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{path} is {kind}: {len(raw)} bytes, header promises {expected}")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=4 + 4 * ndim)
    return data.view(*shape)


def _find(folder, name):
    for candidate in (Path(folder) / name, Path(folder) / (name + ".gz")):
        if candidate.exists():
            return candidate
    return None


def load_idx_pair(folder, train=True):
    """Images (N, 784) float32 in [0, 1] and labels (N,) int64 from one raw/ folder."""
    img_name, lbl_name = IDX_FILES[train]
    img_path, lbl_path = _find(folder, img_name), _find(folder, lbl_name)
    if img_path is None or lbl_path is None:
        missing = img_name if img_path is None else lbl_name
        raise FileNotFoundError(errno.ENOENT, "no such file", str(Path(folder) / missing))
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.dim() != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{img_path} holds images of shape {tuple(images.shape[1:])}, not 28x28")
    if labels.dim() != 1:
        raise DataError(f"{lbl_path} is not a label file (it has {labels.dim()} dimensions)")
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    if len(labels) and labels.max() >= CLASSES:
        raise DataError(f"{lbl_path} has a label {int(labels.max())}, outside 0-9")
    return images.reshape(len(images), 784).float().div_(255), labels.long()


def load_mnist(data_dir, train=True, dataset="MNIST"):
    """Load a split of MNIST (or "FashionMNIST") from DATA_DIR/<dataset>/raw.

    Files already there are read directly; otherwise torchvision downloads them
    (`torchvision.datasets.<dataset>(data_dir, download=True)`).
    Returns x: (N, 784) float32 in [0, 1] and y: (N,) int64.
    """
    raw = Path(data_dir) / dataset / "raw"
    try:
        return load_idx_pair(raw, train)
    except FileNotFoundError as e:
        missing = Path(e.filename).name
    import torchvision

    try:
        getattr(torchvision.datasets, dataset)(str(data_dir), train=train, download=True)
    except Exception as e:  # no network, a proxy, a full disk: one line, no traceback
        lines = [line for line in str(e).splitlines() if line.strip()]
        reason = lines[-1].strip("<> ") if lines else type(e).__name__
        raise DataError(
            f"no {dataset} file {missing} in {raw} and the download failed ({reason}); "
            f"put the four *-ubyte files there, or point --data-dir at a folder holding "
            f"{dataset}/raw/ (see README)"
        ) from None
    return load_idx_pair(raw, train)


def load_image_folder(folder):
    """Every PNG/JPEG under `folder` (e.g. notMNIST-459/A/*.png) as (N, 784) in [0, 1]."""
    from PIL import Image

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise DataError(f"no PNG or JPEG images under {folder}")
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("L")
                if im.size != (28, 28):
                    im = im.resize((28, 28), Image.BILINEAR)
                images.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8))
        except OSError as e:
            raise DataError(f"cannot read image {p}: {e}") from None
    return torch.stack(images).float().div_(255)


def load_fashion(data_dir, fashion_dir=None):
    """Fashion-MNIST test images (10000, 784): from fashion_dir, DATA_DIR, or Debian's folder."""
    folders = [fashion_dir] if fashion_dir else [Path(data_dir) / "FashionMNIST" / "raw", FASHION_SYSTEM_DIR]
    for folder in folders:
        try:
            return load_idx_pair(folder, train=False)[0]
        except FileNotFoundError:
            continue
    raise FileNotFoundError(
        f"Fashion-MNIST test files not found in {' or '.join(map(str, folders))} "
        f"(apt-get install dataset-fashion-mnist, or --fashion-dir)"
    )


# -----------------------------------------------------------------------------
# The BNN: the article's 784-1024-10 ReLU network. Its nn.Linear layers give the
# parameter names and shapes and the usual init for the guide's means; the weights
# actually used are sampled by the model and the guide.


class BNN(nn.Module):
    """The architecture: 784 -> hidden (ReLU) -> 10 logits.

    `net(x)` runs it at its own initial weights; the posterior lives in Pyro's param
    store (see `guide`), and `predict` / `predict_prob` use it.
    """

    def __init__(self, input_size=784, hidden_size=1024, output_size=10):
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.out = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        return bnn_forward(dict(self.named_parameters()), x)


def bnn_forward(params, x):
    """Logits of the BNN for one weight set or S of them at once.

    params: {"fc1.weight": (H, D), "fc1.bias": (H,), "out.weight": (C, H), "out.bias": (C,)},
    each optionally with a leading sample dim S. x: (B, D).
    Returns (B, C), or (S, B, C) for sampled weight sets (one batched matmul, no loop).
    """
    h = torch.relu(x @ params["fc1.weight"].mT + params["fc1.bias"].unsqueeze(-2))  # (S, B, H)
    return h @ params["out.weight"].mT + params["out.bias"].unsqueeze(-2)  # (S, B, C)


def settings_of(net, prior_scale):
    """What is needed to rebuild the model: stored next to the guide's parameters."""
    return {
        "input_size": net.fc1.in_features,
        "hidden_size": net.fc1.out_features,
        "output_size": net.out.out_features,
        "prior_scale": prior_scale,
    }


# -----------------------------------------------------------------------------
# The model: Normal(0, prior_scale) on every weight and bias, a categorical likelihood.


def model(x_data, y_data=None, num_data=None, *, net, prior_scale=1.0):
    """p(w) p(y | x, w). x_data: (B, 784); y_data: (B,) or None; num_data: training-set size.

    The data plate scales the minibatch log-likelihood by num_data / B, so the ELBO of one
    minibatch estimates the full-data ELBO: the KL is counted once per data set, not once
    per batch as in the article (469x too heavy there).
    """
    zero = x_data.new_zeros(())
    params = {}
    for name, p in net.named_parameters():
        # .to_event: a weight matrix is one draw of a (H, D)-shaped random variable.
        prior = dist.Normal(zero, zero + prior_scale).expand(p.shape).to_event(p.dim())
        params[name] = pyro.sample(name, prior)
    logits = bnn_forward(params, x_data)  # (B, 10)
    batch = x_data.shape[0]
    # The loader drew the minibatch; the plate only needs its size and num_data.
    with pyro.plate("data", size=num_data or batch, subsample=torch.arange(batch, device=x_data.device)):
        pyro.sample("obs", dist.Categorical(logits=logits), obs=y_data)
    return logits


# -----------------------------------------------------------------------------
# The guide: mean-field Normal, q(w) = prod N(loc, softplus(rho)), as in the article.


def inverse_softplus(y):
    return y + math.log(-math.expm1(-y))


def guide(x_data, y_data=None, num_data=None, *, net, init_scale=DEFAULTS.init_scale):
    """q(w): one `<name>_loc` and one `<name>_rho` param per weight tensor; scale = softplus(rho).

    Locations start at the layer's usual (Kaiming-uniform) init, not N(0, 1) as in the
    article; scales start at init_scale (the article's ~0.8 made the net start as noise).
    """
    params = {}
    for name, p in net.named_parameters():
        loc = pyro.param(f"{name}_loc", lambda p=p: p.detach().clone())  # init only on first call
        rho = pyro.param(f"{name}_rho", lambda p=p: torch.full_like(p.detach(), inverse_softplus(init_scale)))
        params[name] = pyro.sample(name, dist.Normal(loc, F.softplus(rho)).to_event(p.dim()))
    return params


# -----------------------------------------------------------------------------
# Training: SVI with Adam, minibatches of 128 shuffled each epoch.


class TrainingDiverged(RuntimeError):
    """The loss or a parameter became NaN or infinite."""


class Interrupted(Exception):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class MeanFieldELBO(TraceMeanField_ELBO):
    """TraceMeanField_ELBO that evaluates log-probs only where its loss uses them.

    Pyro evaluates log_prob at every site of both traces, but with analytic KLs only the
    observed site's log-prob enters the ELBO: skipping the 8 unused Normal log-probs over
    the 814k weights saves about a fifth of a CPU training step. Same loss, same
    gradients. With Pyro validation on, the stock path (and all its checks) runs instead.
    """

    def _get_trace(self, model, guide, args, kwargs):
        if pyro.infer.util.is_validation_enabled():
            return super()._get_trace(model, guide, args, kwargs)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
        model_trace.compute_log_prob(site_filter=lambda name, site: site["is_observed"])
        return model_trace, guide_trace


def make_svi(net, lr, lr_decay=1.0, prior_scale=1.0, init_scale=DEFAULTS.init_scale, elbo="meanfield",
             scale_lr_factor=1.0):
    """SVI over the model and guide. lr_decay multiplies the learning rate after each step.

    ClippedAdam is Adam with that per-step decay kept in its own state (so a resumed run
    decays exactly like an uninterrupted one); clipping is switched off (clip_norm=inf).
    """
    optim = ClippedAdam(lambda param_name: {
        "lr": lr * (scale_lr_factor if param_name.endswith("_rho") else 1.0),
        "lrd": lr_decay,
        "clip_norm": float("inf"),
    })
    # The analytic KL of TraceMeanField_ELBO is the same objective as Trace_ELBO's
    # Monte Carlo estimate, with less gradient noise and less work per step.
    loss = MeanFieldELBO() if elbo == "meanfield" else Trace_ELBO()
    svi = SVI(
        partial(model, net=net, prior_scale=prior_scale),
        partial(guide, net=net, init_scale=init_scale),
        optim,
        loss,
    )
    return svi, optim




def keep_freed_memory():
    """Ask glibc's malloc to reuse freed memory instead of handing it back to the kernel.

    Every training step allocates and frees a few dozen tensors of up to 3 MiB (the
    sampled 1024x784 weights, their noise, their gradients). By default glibc returns such
    blocks to the kernel and gets fresh zeroed pages next step: millions of page faults
    per epoch, about a third of the time of a CPU epoch here (README, "Speed"). Raising
    the mmap and trim thresholds keeps the blocks for reuse. Nothing computed changes.
    A no-op where the C library is not glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
        libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest allowed value
        libc.mallopt(m_trim_threshold, 1024 * 2**20)
    except (OSError, AttributeError):
        pass


def _params_finite():
    return all(bool(torch.isfinite(v).all()) for v in pyro.get_param_store().values())


def train(
    net,
    x_train,
    y_train,
    *,
    epochs=DEFAULTS.epochs,
    batch_size=DEFAULTS.batch_size,
    lr=DEFAULTS.lr,
    lr_decay=DEFAULTS.lr_decay,
    scale_lr_factor=DEFAULTS.scale_lr_factor,
    prior_scale=DEFAULTS.prior_scale,
    init_scale=DEFAULTS.init_scale,
    elbo=DEFAULTS.elbo,
    max_batches=None,
    validate=False,
    progress=True,
    checkpoint_path=None,
    settings=None,
    resume_state=None,
    stop_requested=None,
    log=print,
):
    """Fit the guide by SVI; returns {"losses": per-epoch -ELBO per example, "train_seconds"}.

    The param store is cleared first unless resume_state (a loaded checkpoint) is given,
    in which case params, optimiser, RNG and position within the epoch are restored and
    training continues exactly where it stopped. With checkpoint_path, a checkpoint is
    written atomically after every epoch, and when stop_requested() turns true (a signal).
    Pyro's argument validation is off here for speed (validate=True turns it on).
    """
    from tqdm.auto import tqdm

    if x_train.device.type == "cpu":
        keep_freed_memory()
    num_data = len(x_train)
    steps_per_epoch = math.ceil(num_data / batch_size)
    if max_batches:
        steps_per_epoch = min(steps_per_epoch, max_batches)
    # lr_decay per epoch, applied smoothly at every step; it does not depend on `epochs`,
    # so 3 epochs and then 2 more with --resume are exactly 5 epochs.
    svi, optim = make_svi(net, lr, lr_decay ** (1 / steps_per_epoch), prior_scale, init_scale, elbo,
                          scale_lr_factor)

    pyro.clear_param_store()
    state = {"epoch": 0, "step": 0, "perm": None, "loss_sum": 0.0, "losses": [], "train_seconds": 0.0}
    if resume_state is not None:
        pyro.get_param_store().set_state(resume_state["params"])
        optim.set_state(resume_state["optim"])
        torch.set_rng_state(resume_state["rng"])
        if resume_state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume_state["cuda_rng"])
        state.update({k: resume_state[k] for k in state})
        if state["perm"] is not None:
            state["perm"] = state["perm"].to(x_train.device)
    else:
        with torch.no_grad():  # create the params now, so a checkpoint always has them
            guide(x_train[:1], net=net, init_scale=init_scale)

    def save(why):
        if checkpoint_path is None:
            return
        if not _params_finite():
            raise TrainingDiverged(f"a parameter became non-finite ({why}); last good checkpoint kept")
        save_checkpoint(checkpoint_path, settings or {}, optim, state)

    started = time.perf_counter() - state["train_seconds"]
    with pyro.validation_enabled(validate), warnings.catch_warnings():
        # A NaN loss is reported below with the epoch and step; Pyro's own warning would repeat it.
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        while state["epoch"] < epochs:
            epoch = state["epoch"]
            if state["perm"] is None:  # a fresh epoch: reshuffle
                state["perm"] = torch.randperm(num_data, device=x_train.device)
            perm = state["perm"]
            bar = tqdm(
                range(state["step"], steps_per_epoch),
                initial=state["step"],
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{epochs}",
                disable=None if progress else True,  # None: off when not a terminal
                leave=False,
            )
            for step in bar:
                idx = perm[step * batch_size : (step + 1) * batch_size]
                loss = svi.step(x_train[idx], y_train[idx], num_data)  # -ELBO estimate, full data
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss} at epoch {epoch + 1} step {step + 1}; "
                        f"lower --lr (last good checkpoint kept)"
                    )
                state["loss_sum"] += loss / num_data
                state["step"] = step + 1
                if progress and step % 20 == 0:
                    bar.set_postfix(loss=f"{state['loss_sum'] / state['step']:.4f}")
                if stop_requested is not None and stop_requested():
                    state["train_seconds"] = time.perf_counter() - started
                    save("interrupted")
                    where = f"epoch {epoch + 1} step {step + 1}"
                    raise Interrupted(f"interrupted at {where}", stop_requested())
            bar.close()
            state["losses"].append(state["loss_sum"] / steps_per_epoch)
            state.update(epoch=epoch + 1, step=0, perm=None, loss_sum=0.0)  # the next epoch reshuffles
            state["train_seconds"] = time.perf_counter() - started
            log(f"epoch {epoch + 1}/{epochs}  loss {state['losses'][-1]:.4f} per example  "
                f"({state['train_seconds']:.1f} s)")
            save(f"end of epoch {epoch + 1}")
    if not _params_finite():
        raise TrainingDiverged("a parameter became non-finite at the end of training")
    return {"losses": state["losses"], "train_seconds": state["train_seconds"]}


# -----------------------------------------------------------------------------
# Prediction: probabilities of posterior samples, averaged (not the logits: the
# article averaged logits, which is not the posterior predictive).


def normalize(x):
    """Check and convert images to the network's input: (B, 784) float32 in [0, 1].

    Accepts (B, 784), (B, 28, 28) or (B, 1, 28, 28), as a tensor or NumPy array. Floats
    must lie in [0, 1]; uint8 images (0-255) are divided by 255. Anything else (other
    shapes or dtypes, NaN, values out of range, an empty batch) raises ValueError.
    """
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"images must be a tensor or array, got {type(x).__name__}: {e}") from None
    if x.dim() == 1 and x.shape[0] == 784 or x.dim() == 2 and tuple(x.shape) == (28, 28):
        raise ValueError(f"got one image of shape {tuple(x.shape)}: pass a batch, e.g. x[None]")
    if not (x.dim() == 2 and x.shape[1] == 784 or x.dim() == 3 and x.shape[1:] == (28, 28)
            or x.dim() == 4 and x.shape[1:] == (1, 28, 28)):
        raise ValueError(f"images must have shape (B, 784), (B, 28, 28) or (B, 1, 28, 28), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: no images to predict")
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif x.is_floating_point():
        x = x.float()
        if torch.isnan(x).any():
            raise ValueError("images contain NaN pixels")
        if x.min() < 0 or x.max() > 1:
            raise ValueError(
                f"pixel values must lie in [0, 1], got [{x.min().item():.4g}, {x.max().item():.4g}]: "
                f"divide 0-255 images by 255 (or pass them as uint8)"
            )
    else:
        raise ValueError(f"images must be float in [0, 1] or uint8 in 0-255, got dtype {x.dtype}")
    return x.reshape(x.shape[0], 784)


def sample_weights(net, num_samples):
    """Draw num_samples weight sets from the guide in one vectorised call: {name: (S, ...)}."""
    with torch.no_grad(), pyro.plate("samples", num_samples, dim=-1):
        trace = poutine.trace(guide).get_trace(None, net=net)
    return {name: site["value"] for name, site in trace.nodes.items() if site["type"] == "sample"}


def sample_probs(x, net, num_samples=DEFAULTS.num_samples, max_elements=2**25):
    """Class probabilities of each posterior sample: (S, B, 10), on x's device.

    Work is chunked over samples and images so the hidden activations (s, b, H) never
    exceed max_elements floats (128 MiB by default), whatever S and B are.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    device = next(net.parameters()).device
    x = normalize(x).to(device)
    hidden = net.fc1.out_features
    out = torch.empty(num_samples, x.shape[0], net.out.out_features, device=device)
    s_chunk = max(1, min(num_samples, max_elements // (hidden * min(x.shape[0], 1024))))
    b_chunk = max(1, max_elements // (hidden * s_chunk))
    with torch.no_grad():
        for s in range(0, num_samples, s_chunk):
            weights = sample_weights(net, min(s_chunk, num_samples - s))
            for b in range(0, x.shape[0], b_chunk):
                logits = bnn_forward(weights, x[b : b + b_chunk])  # (s, b, 10)
                out[s : s + s_chunk, b : b + b_chunk] = torch.softmax(logits, -1)
    return out


def predict_prob(x, net, num_samples=DEFAULTS.num_samples):
    """Posterior predictive p(y | x): the mean of num_samples samples' probabilities, (B, 10)."""
    return sample_probs(x, net, num_samples).mean(0)


def predict(x, net, num_samples=DEFAULTS.num_samples):
    """The class the network is forced to predict: argmax of predict_prob, (B,)."""
    return predict_prob(x, net, num_samples).argmax(-1)


def evaluate(probs, y):
    """Accuracy, NLL, Brier score and ECE of mean probabilities (B, 10) against labels (B,)."""
    y = y.to(probs.device)
    p_true = probs.gather(1, y[:, None]).squeeze(1)
    onehot = F.one_hot(y, probs.shape[1]).to(probs.dtype)
    return {
        "accuracy": (probs.argmax(1) == y).float().mean().item(),
        "nll": -torch.log(p_true.clamp_min(1e-12)).mean().item(),
        "brier": ((probs - onehot) ** 2).sum(1).mean().item(),
        "ece": expected_calibration_error(probs, y),
    }


# -----------------------------------------------------------------------------
# Saying "I don't know": uncertainty from the (S, B, 10) sample probabilities.
# Every measure is "higher = more uncertain".


def entropy(p, dim=-1):
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


def uncertainty(probs):
    """Per-image uncertainty measures from sample probabilities (S, B, 10), each (B,).

    predictive_entropy = H[mean_s p_s]    (total)
    expected_entropy   = mean_s H[p_s]    (aleatoric: each sample unsure)
    mutual_information = the difference   (epistemic: the samples disagree)
    max_prob           = 1 - max_c mean_s p_s[c]
    """
    mean = probs.mean(0)
    pe = entropy(mean)
    ee = entropy(probs).mean(0)
    return {
        "predictive_entropy": pe,
        "expected_entropy": ee,
        "mutual_information": (pe - ee).clamp_min(0),
        "max_prob": 1 - mean.max(-1).values,
    }


MEASURES = ("predictive_entropy", "expected_entropy", "mutual_information", "max_prob")
MEASURE_RANGE = {m: (0.0, math.log(CLASSES)) for m in MEASURES} | {"max_prob": (0.0, 1 - 1 / CLASSES)}
# Chosen on MNIST *training* images, never the test set: each is about the 97th percentile
# of its measure over the first 20,000 training images (100 samples; seeds 0, 1, 2 at
# default settings gave 0.0016-0.0018 for mutual information, 0.44-0.45 for entropy).
# On the test set that refuses about 4.5% of the digits; README, "Saying I don't know".
DEFAULT_THRESHOLDS = {
    "predictive_entropy": 0.45,
    "expected_entropy": 0.45,
    "mutual_information": 0.0017,
    "max_prob": 0.12,
}


def predict_or_abstain(x, net, measure=DEFAULTS.measure, threshold=None, num_samples=DEFAULTS.unc_samples):
    """The class, or -1 ("I don't know") where the measure exceeds threshold: (B,) int64."""
    threshold = DEFAULT_THRESHOLDS[measure] if threshold is None else threshold
    probs = sample_probs(x, net, num_samples)
    pred = probs.mean(0).argmax(-1)
    return torch.where(uncertainty(probs)[measure] > threshold, -1, pred)


def abstention(score, correct, threshold):
    """Coverage (fraction accepted) and accuracy on the accepted inputs."""
    accepted = score <= threshold
    n = int(accepted.sum())
    return {
        "coverage": n / len(score),
        "refused": 1 - n / len(score),
        "accuracy_accepted": float(correct[accepted].float().mean()) if n else float("nan"),
    }


def accuracy_coverage_curve(score, correct):
    """Accept the k most certain images, k = 1..B: (coverage, accuracy) arrays of length B."""
    order = torch.argsort(score, stable=True)
    hits = correct[order].float().cumsum(0)
    k = torch.arange(1, len(score) + 1, dtype=torch.float)
    return k / len(score), hits / k


def auroc(score_in, score_out):
    """Area under the ROC of telling out- from in-distribution by score (higher = out).

    The Mann-Whitney statistic with ties counted half: 1.0 = perfectly separated,
    0.5 = no better than chance (identical scores).
    """
    scores = torch.cat([score_in, score_out]).double()
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=torch.double)
    # average ranks over ties
    uniq, inverse = torch.unique(scores, return_inverse=True)
    ranks = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inverse, ranks)
    ranks = (ranks / torch.bincount(inverse, minlength=len(uniq)).double())[inverse]
    n_in, n_out = len(score_in), len(score_out)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def calibration_bins(probs, y, bins=15):
    """Per equal-width confidence bin: count, mean confidence, accuracy (lists of length bins)."""
    conf, pred = probs.max(1)
    correct = (pred == y.to(probs.device)).float()
    which = (conf * bins).long().clamp(max=bins - 1)
    count = torch.bincount(which, minlength=bins).float()
    conf_sum = torch.zeros(bins, device=probs.device).index_add_(0, which, conf)
    acc_sum = torch.zeros(bins, device=probs.device).index_add_(0, which, correct)
    safe = count.clamp_min(1)
    return count.cpu(), (conf_sum / safe).cpu(), (acc_sum / safe).cpu()


def expected_calibration_error(probs, y, bins=15):
    """ECE: sum over 15 equal-width bins of |accuracy - confidence| weighted by bin size."""
    count, conf, acc = calibration_bins(probs, y, bins)
    return float((count / count.sum() * (acc - conf).abs()).sum())


# -----------------------------------------------------------------------------
# Plots: each builds its own figure, saves it to `path` when given, else shows it
# in a notebook; returns the figure. matplotlib/seaborn are imported here, not above.


def _figure(nrows=1, ncols=1, figsize=(8, 3.5), **kw):
    import seaborn as sns
    from matplotlib.figure import Figure

    sns.set_theme(style="whitegrid", context="notebook")
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _finish(fig, path):
    if path is not None:
        fmt = Path(path).suffix.lstrip(".") or "png"
        atomic_save(fig, path, write=lambda f, file: f.savefig(file, dpi=110, format=fmt))
    else:
        try:  # in a notebook: show it as a PNG (works whatever matplotlib backend is active)
            from IPython import get_ipython
            from IPython.display import Image, display

            if get_ipython() is not None:
                buffer = io.BytesIO()
                fig.savefig(buffer, dpi=110, format="png")
                display(Image(data=buffer.getvalue(), format="png"))
        except ImportError:
            pass
    return fig


def _digit(ax, image, title=None):
    ax.imshow(image.reshape(28, 28).cpu().numpy(), cmap="gray_r", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title, fontsize=10)


def plot(x, probs, label=None, path=None):
    """The article's figure: the digit beside a bar chart of its class probabilities.

    x: one image (784,), (28, 28) or (1, 28, 28). probs: (S, 10) sample probabilities
    (bars are their mean, whiskers the 5-95% spread, dots the samples) or (10,).
    """
    x = torch.as_tensor(x).detach().cpu()
    if x.numel() != 784:
        raise ValueError(f"plot takes one 28x28 image, got shape {tuple(x.shape)}")
    image = normalize(x.reshape(1, 784))[0]
    probs = torch.as_tensor(probs, dtype=torch.float).detach().cpu()
    probs = probs[None] if probs.dim() == 1 else probs
    if probs.dim() != 2 or probs.shape[1] != CLASSES:
        raise ValueError(f"probs must have shape (S, 10) or (10,), got {tuple(probs.shape)}")
    mean = probs.mean(0)
    pred = int(mean.argmax())
    fig, axes = _figure(1, 2, figsize=(8, 3.2), width_ratios=[1, 2.6])
    truth = "" if label is None else f"truth {int(label)}, "
    _digit(axes[0, 0], image, f"{truth}predicted {pred}")
    ax = axes[0, 1]
    colors = ["#c44e52" if c == pred else "#4c72b0" for c in range(CLASSES)]
    ax.bar(range(CLASSES), mean.numpy(), color=colors, alpha=0.85, label="mean over samples")
    if len(probs) > 1:
        lo, hi = probs.quantile(0.05, 0), probs.quantile(0.95, 0)
        ax.errorbar(range(CLASSES), mean.numpy(), yerr=[(mean - lo).numpy(), (hi - mean).numpy()],
                    fmt="none", ecolor="black", capsize=3, lw=1, label="5-95% of samples")
        jitter = (torch.rand(probs.shape) - 0.5) * 0.4
        ax.scatter((torch.arange(CLASSES) + jitter).flatten().numpy(), probs.flatten().numpy(), s=4, color="black",
                   alpha=0.25, label=f"{len(probs)} posterior samples")
    ax.set_xticks(range(CLASSES))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("class")
    ax.set_ylabel("predictive probability")
    ax.set_title(f"p(class | image), mean {mean[pred]:.2f} for {pred}")
    ax.legend(loc="upper left", fontsize=8)
    return _finish(fig, path)


def plot_reliability(probs, y, path=None, bins=15):
    """Reliability diagram: accuracy against confidence in 15 equal-width bins."""
    count, conf, acc = (t.numpy() for t in calibration_bins(probs, y, bins))
    ece = expected_calibration_error(probs, y, bins)
    fig, axes = _figure(1, 2, figsize=(9, 4))
    ax = axes[0, 0]
    edges = torch.linspace(0, 1, bins + 1).numpy()
    centers, width = (edges[:-1] + edges[1:]) / 2, 1 / bins
    used = count > 0
    ax.bar(centers[used], acc[used], width=width * 0.9, color="#4c72b0", label="accuracy in bin")
    ax.plot(centers[used], conf[used], "o", color="#c44e52", ms=5, label="mean confidence in bin")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlabel("confidence (max mean probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability, MNIST test (ECE {ece:.4f})")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[0, 1]
    ax.bar(centers, count, width=width * 0.9, color="#55a868")
    ax.set_yscale("log")
    ax.set_xlabel("confidence")
    ax.set_ylabel("images (log scale)")
    ax.set_title("Images per confidence bin")
    return _finish(fig, path)


def plot_coverage(score, correct, threshold, measure, path=None):
    """Accuracy on the accepted images against coverage, the default threshold marked."""
    cov, acc = (t.numpy() for t in accuracy_coverage_curve(score, correct))
    point = abstention(score, correct, threshold)
    fig, axes = _figure(figsize=(6, 4))
    ax = axes[0, 0]
    ax.plot(cov, acc, color="#4c72b0", label=f"accept the most certain by {measure}")
    ax.scatter([point["coverage"]], [point["accuracy_accepted"]], color="#c44e52", zorder=3,
               label=f"threshold {threshold:g}: {point['coverage']:.1%} kept, {point['accuracy_accepted']:.2%} right")
    ax.set_xlabel("coverage (fraction of MNIST test images accepted)")
    ax.set_ylabel("accuracy on accepted images")
    ax.set_ylim(max(0.9, float(acc.min()) - 0.005), 1.001)
    ax.set_title("Accuracy versus coverage")
    ax.legend(loc="lower left", fontsize=8)
    return _finish(fig, path)


def plot_histograms(scores, measure, threshold, path=None):
    """Histograms of one uncertainty measure for each data set (dict name -> (B,) scores).

    The x axis is logarithmic: mutual information spans several orders of magnitude.
    """
    import numpy as np

    fig, axes = _figure(figsize=(7.5, 4))
    ax = axes[0, 0]
    values = {name: score.detach().cpu().double().numpy() for name, score in scores.items()}
    everything = np.concatenate(list(values.values()))
    lo = max(1e-6, min(threshold, everything[everything > 0].min(initial=1.0)))
    hi = max(threshold, everything.max()) * 1.05
    edges = np.logspace(np.log10(lo), np.log10(hi), 60)
    for name, v in values.items():
        ax.hist(np.clip(v, lo, None), bins=edges, histtype="stepfilled", alpha=0.35, density=False,
                weights=np.full(len(v), 1 / len(v)), label=f"{name} ({len(v)} images)")
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:g}: refuse to the right")
    ax.set_xscale("log")
    ax.set_xlabel(measure.replace("_", " ") + (" (nats)" if measure != "max_prob" else " (1 - max probability)"))
    ax.set_ylabel("fraction of images")
    ax.set_title("Uncertainty: in- versus out-of-distribution")
    ax.legend(fontsize=8, loc="upper left")
    return _finish(fig, path)


def plot_examples(x, probs, score, threshold, labels=None, path=None, ncols=6):
    """A grid of images, each above its per-class sample spread, accepted/refused marked.

    x: (N, 784); probs: (S, N, 10); score: (N,).
    """
    n = x.shape[0]
    nrows = math.ceil(n / ncols)
    fig, axes = _figure(2 * nrows, ncols, figsize=(2.1 * ncols, 3.6 * nrows), height_ratios=[1.2, 1] * nrows)
    for i in range(nrows * ncols):
        r, c = divmod(i, ncols)
        top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
        if i >= n:
            top.axis("off")
            bottom.axis("off")
            continue
        p = probs[:, i].cpu()
        pred = int(p.mean(0).argmax())
        refused = bool(score[i] > threshold)
        verdict = "refused" if refused else f"says {pred}"
        truth = f" (true {int(labels[i])})" if labels is not None and labels[i] >= 0 else ""
        _digit(top, x[i], f"{verdict}{truth}")
        for spine in top.spines.values():
            spine.set_visible(True)
            spine.set_color("#c44e52" if refused else "#55a868")
            spine.set_linewidth(3)
        bottom.boxplot(p.numpy(), positions=range(CLASSES), widths=0.6, showfliers=False)
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_xticks(range(CLASSES))
        bottom.tick_params(labelsize=7)
        bottom.set_xlabel(f"class (score {float(score[i]):.2g})", fontsize=8)
        if c == 0:
            bottom.set_ylabel("p over samples", fontsize=8)
    fig.suptitle("Posterior samples per class; red frame: \"I don't know\", green: accepted")
    return _finish(fig, path)


# -----------------------------------------------------------------------------
# Saving: the guide for later use, checkpoints for resuming. Every write is atomic:
# a temporary file in the same folder, flushed and fsynced, then renamed.


def atomic_save(obj, path, write=None):
    """Write obj (torch.save, or write(obj, file)) to path so that path is never half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OSError(f"could not save {path}: {e.strerror or e} (the previous file is kept)") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path, settings, optim, state):
    atomic_save(
        {
            "format": CHECKPOINT_FORMAT,
            "settings": settings,
            "params": pyro.get_param_store().get_state(),
            "optim": optim.get_state(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            **state,
        },
        path,
    )


def _load(path, expected_format, device):
    try:
        obj = torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable bnn_mnist file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} has format {found!r}, expected {expected_format!r}")
    return obj


def load_checkpoint(path, device="cpu"):
    obj = _load(path, CHECKPOINT_FORMAT, device)
    obj["rng"] = obj["rng"].cpu()  # RNG states are CPU byte tensors, whatever map_location did
    if obj.get("cuda_rng") is not None:
        obj["cuda_rng"] = [state.cpu() for state in obj["cuda_rng"]]
    return obj


def save_guide(path, net, prior_scale):
    """The trained guide: Pyro's param store plus the settings to rebuild the BNN."""
    atomic_save({"format": GUIDE_FORMAT, "settings": settings_of(net, prior_scale),
                 "params": pyro.get_param_store().get_state()}, path)


def load_guide(path, device="cpu"):
    """Rebuild the BNN from a saved guide and load its params into Pyro's param store."""
    obj = _load(path, GUIDE_FORMAT, device)
    s = obj["settings"]
    net = BNN(s["input_size"], s["hidden_size"], s["output_size"]).to(device)
    check_params_match(obj["params"], net, path)
    pyro.clear_param_store()
    pyro.get_param_store().set_state(obj["params"])
    return net


def check_params_match(param_state, net, path):
    for name, p in net.named_parameters():
        for suffix in ("_loc", "_rho"):
            saved = param_state["params"].get(name + suffix)
            if saved is None:
                raise ValueError(f"{path} has no parameter {name + suffix}")
            if saved.shape != p.shape:
                raise ValueError(f"{path} holds {name + suffix} of shape {tuple(saved.shape)}, "
                                 f"but this BNN needs {tuple(p.shape)} (a different --hidden-size?)")


# -----------------------------------------------------------------------------
# Command line.


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' except where X is None or False, which the help text explains."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser():
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="bnn_mnist.py",
        description="Train a Bayesian neural network on MNIST with Pyro; predict, say 'I don't know'.",
        formatter_class=_HelpFormatter,
    )
    pos_int, pos_float = _positive(int), _positive(float)
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data-dir", default=d.data_dir, help="folder holding MNIST/raw (downloaded there if missing)")
    g.add_argument("--out-dir", default=d.out_dir, help="every output goes here: metrics.json, guide.pt, PNGs")
    g = p.add_argument_group("model and training")
    g.add_argument("--epochs", type=pos_int, default=d.epochs, help="passes over the training set")
    g.add_argument("--batch-size", type=pos_int, default=d.batch_size, help="minibatch size")
    g.add_argument("--lr", type=pos_float, default=d.lr, help="Adam's initial learning rate")
    g.add_argument("--lr-decay", type=pos_float, default=d.lr_decay,
                   help="factor applied to the learning rate over each epoch, smoothly per step (1: constant)")
    g.add_argument("--scale-lr-factor", type=pos_float, default=d.scale_lr_factor,
                   help="the guide's scales (rho) use this multiple of the learning rate")
    g.add_argument("--hidden-size", type=pos_int, default=d.hidden_size, help="hidden units")
    g.add_argument("--prior-scale", type=pos_float, default=d.prior_scale, help="std of the Normal(0, s) prior")
    g.add_argument("--init-scale", type=pos_float, default=d.init_scale, help="initial std of the guide")
    g.add_argument("--elbo", choices=("meanfield", "trace"), default=d.elbo,
                   help="meanfield: TraceMeanField_ELBO (analytic KL); trace: Trace_ELBO (sampled KL)")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="auto: cuda if available")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    g = p.add_argument_group("prediction and uncertainty")
    g.add_argument("--num-samples", type=pos_int, default=d.num_samples,
                   help="posterior samples for the forced prediction (test accuracy)")
    g.add_argument("--unc-samples", type=pos_int, default=d.unc_samples,
                   help="posterior samples for uncertainty, abstention and OOD")
    g.add_argument("--measure", choices=MEASURES, default=d.measure, help="uncertainty measure for refusing")
    g.add_argument("--threshold", type=float, default=d.threshold,
                   help="refuse when the measure exceeds this (default: the measure's own, see README)")
    g.add_argument("--ood", default=d.ood,
                   help="comma-separated out-of-distribution sets from fashion, notmnist, noise; or 'none'")
    g.add_argument("--fashion-dir", default=d.fashion_dir,
                   help="folder with Fashion-MNIST t10k-*-ubyte[.gz] (default: DATA_DIR/FashionMNIST/raw, "
                        f"then {FASHION_SYSTEM_DIR})")
    g.add_argument("--notmnist-dir", default=d.notmnist_dir,
                   help="folder of letter images (default: DATA_DIR/notMNIST-459)")
    g.add_argument("--noise-count", type=pos_int, default=d.noise_count, help="uniform-noise images")
    g = p.add_argument_group("smoke runs")
    g.add_argument("--max-batches", type=pos_int, default=d.max_batches, help="cap on minibatches per epoch (default: all)")
    g.add_argument("--train-subset", type=pos_int, default=d.train_subset, help="train on the first N images (default: all)")
    g.add_argument("--no-plots", action="store_true", help="write no figures")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda was asked for but no CUDA device is available")
    if args.threshold is not None:
        lo, hi = MEASURE_RANGE[args.measure]
        if not lo <= args.threshold <= hi:
            parser.error(f"argument --threshold: {args.measure} lies in [{lo:g}, {hi:.4g}], got {args.threshold:g}")
    sets = [s.strip() for s in args.ood.split(",") if s.strip()]
    if sets == ["none"] or not sets:
        sets = []
    bad = [s for s in sets if s not in ("fashion", "notmnist", "noise")]
    if bad:
        parser.error(f"argument --ood: unknown set(s) {', '.join(bad)} (choose from fashion, notmnist, noise, none)")
    args.ood = ",".join(sets)
    return Config(**vars(args))


class _SignalFlag:
    """Turns SIGINT/SIGTERM into a flag that the training loop checks after each step."""

    def __init__(self):
        self.signum = 0

    def __call__(self):
        return self.signum

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


OUTPUTS = ("metrics.json", "guide.pt", "checkpoint.pt", "prediction.png", "reliability.png",
           "coverage.png", "uncertainty_hist.png", "examples.png")


def _prepare_out_dir(out_dir):
    """Create out_dir, check it is writable, and remove temporary files a killed run left."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
        for name in OUTPUTS:
            for leftover in out.glob(f"{name}.*.tmp"):  # atomic_save's temporary files
                leftover.unlink()
    except OSError as e:
        raise OSError(f"cannot write to --out-dir {out}: {e.strerror or e}") from None
    return out


def run(cfg):
    """The whole pipeline for one Config; returns the metrics dict (also in metrics.json)."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    out = _prepare_out_dir(cfg.out_dir)
    pyro.set_rng_seed(cfg.seed)

    x_train, y_train = load_mnist(cfg.data_dir, train=True)
    x_test, y_test = load_mnist(cfg.data_dir, train=False)
    if cfg.train_subset:
        x_train, y_train = x_train[: cfg.train_subset], y_train[: cfg.train_subset]
    x_train, y_train = x_train.to(device), y_train.to(device)  # resident on the device
    x_test, y_test = x_test.to(device), y_test.to(device)
    print(f"data: {len(x_train)} training, {len(x_test)} test images from {cfg.data_dir}; device {device}")

    net = BNN(784, cfg.hidden_size, CLASSES).to(device)
    settings = settings_of(net, cfg.prior_scale) | {
        k: getattr(cfg, k) for k in ("epochs", "batch_size", "lr", "lr_decay", "scale_lr_factor", "init_scale",
                                     "elbo", "seed", "max_batches", "train_subset")}
    ckpt_path = out / "checkpoint.pt"
    resume_state = None
    if cfg.resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        resume_state = load_checkpoint(ckpt_path, device)
        check_params_match(resume_state["params"], net, ckpt_path)
        changed = {k: (resume_state["settings"].get(k), v) for k, v in settings.items()
                   if k != "epochs" and resume_state["settings"].get(k) != v}
        if changed:
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise ValueError(f"--resume: {ckpt_path} was made with other settings ({what})")
        print(f"resuming from {ckpt_path}: epoch {resume_state['epoch']}, step {resume_state['step']}")
    elif ckpt_path.exists():
        print(f"note: starting afresh; {ckpt_path} from an earlier run will be replaced "
              f"(--resume continues it instead)")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _SignalFlag() as flag:
        result = train(
            net, x_train, y_train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
            lr_decay=cfg.lr_decay, scale_lr_factor=cfg.scale_lr_factor, prior_scale=cfg.prior_scale,
            init_scale=cfg.init_scale, elbo=cfg.elbo, max_batches=cfg.max_batches, checkpoint_path=ckpt_path, settings=settings,
            resume_state=resume_state, stop_requested=flag,
        )
        if flag():  # the signal came during the last checkpoint write: stop now all the same
            raise Interrupted(f"interrupted after epoch {cfg.epochs}", flag())
    losses, train_seconds = result["losses"], result["train_seconds"]
    save_guide(out / "guide.pt", net, cfg.prior_scale)

    # The forced prediction of the article: 10 samples, every test image gets a class.
    _sync(device)
    t0 = time.perf_counter()
    probs10 = predict_prob(x_test, net, cfg.num_samples)
    _sync(device)
    predict_seconds = time.perf_counter() - t0
    forced = evaluate(probs10, y_test)
    print(f"test accuracy {forced['accuracy']:.4f}  NLL {forced['nll']:.4f}  "
          f"({cfg.num_samples} samples, {predict_seconds:.2f} s)")

    metrics = {
        "test_accuracy": forced["accuracy"],
        "test_nll": forced["nll"],
        "epochs": cfg.epochs,
        "epoch_losses": losses,
        "train_seconds": train_seconds,
        "predict_seconds": predict_seconds,
        "num_samples": cfg.num_samples,
        "device": str(device),
        "seed": cfg.seed,
    }
    if not cfg.no_plots:  # the article's figure, for the first test digit
        plot(x_test[0].cpu(), sample_probs(x_test[:1], net, cfg.num_samples)[:, 0], label=y_test[0],
             path=out / "prediction.png")
    write_json(metrics, out / "metrics.json")  # kept even if the uncertainty part fails

    metrics |= uncertainty_report(cfg, net, x_test, y_test, device, out)
    metrics["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        metrics["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    write_json(metrics, out / "metrics.json")
    print(f"wrote {out / 'metrics.json'}")
    return metrics


def uncertainty_report(cfg, net, x_test, y_test, device, out):
    """Calibration, abstention and OOD numbers (and their figures) for metrics.json."""
    threshold = DEFAULT_THRESHOLDS[cfg.measure] if cfg.threshold is None else cfg.threshold
    probs = sample_probs(x_test, net, cfg.unc_samples)  # (S, 10000, 10)
    mean = probs.mean(0)
    scores = {"MNIST": uncertainty(probs)}
    correct = (mean.argmax(1) == y_test).cpu()
    cal = evaluate(mean, y_test)
    report = {
        "unc_samples": cfg.unc_samples,
        "calibration": {k: cal[k] for k in ("accuracy", "nll", "brier", "ece")},
        "measure": cfg.measure,
        "threshold": threshold,
        "abstention": {"MNIST": abstention(scores["MNIST"][cfg.measure].cpu(), correct, threshold)},
        "auroc": {},
        "ood_skipped": {},
    }

    ood = {}
    for name in filter(None, cfg.ood.split(",")):
        try:
            if name == "fashion":
                ood["Fashion-MNIST"] = load_fashion(cfg.data_dir, cfg.fashion_dir)
            elif name == "notmnist":
                ood["notMNIST"] = load_image_folder(cfg.notmnist_dir or Path(cfg.data_dir) / "notMNIST-459")
            elif name == "noise":
                g = torch.Generator().manual_seed(cfg.seed + 1)
                ood["noise"] = torch.rand(cfg.noise_count, 784, generator=g)
        except (FileNotFoundError, DataError) as e:
            report["ood_skipped"][name] = str(e)
            print(f"warning: skipping OOD set {name}: {e}", file=sys.stderr)
    first_two = {}  # each OOD set's first two images' sample probabilities, for the example grid
    for name, x in ood.items():
        p = sample_probs(x.to(device), net, cfg.unc_samples)  # (S, N, 10)
        first_two[name] = p[:, :2].clone()
        s = uncertainty(p)
        scores[name] = s
        report["abstention"][name] = {"refused": float((s[cfg.measure] > threshold).float().mean())}
        report["auroc"][name] = {m: auroc(scores["MNIST"][m].cpu(), s[m].cpu()) for m in MEASURES}

    a = report["abstention"]["MNIST"]
    print(f"calibration: NLL {cal['nll']:.4f}  Brier {cal['brier']:.4f}  ECE {cal['ece']:.4f} "
          f"({cfg.unc_samples} samples)")
    print(f"refusing when {cfg.measure} > {threshold:g}: MNIST refused {a['refused']:.1%}, "
          f"{a['accuracy_accepted']:.2%} right on the rest" +
          "".join(f"; {n} refused {report['abstention'][n]['refused']:.1%}" for n in ood))
    for n, r in report["auroc"].items():
        best = max(r, key=r.get)
        print(f"AUROC MNIST vs {n}: best {best} {r[best]:.4f}")

    if not cfg.no_plots:
        plot_reliability(mean, y_test, path=out / "reliability.png")
        plot_coverage(scores["MNIST"][cfg.measure].cpu(), correct, threshold, cfg.measure,
                      path=out / "coverage.png")
        plot_histograms({n: s[cfg.measure] for n, s in scores.items()}, cfg.measure, threshold,
                        path=out / "uncertainty_hist.png")
        # Six MNIST digits (the three most and three least certain) and two of each OOD set,
        # shown with the same posterior samples that scored them above.
        order = scores["MNIST"][cfg.measure].cpu().argsort()
        pick = torch.cat([order[:3], order[-3:]])
        xs = torch.cat([x_test[pick].cpu(), *(x[:2].cpu() for x in ood.values())])
        ps = torch.cat([probs[:, pick.to(probs.device)], *first_two.values()], dim=1)  # (S, N, 10)
        labels = torch.cat([y_test[pick].cpu(), torch.full((len(xs) - len(pick),), -1)])
        plot_examples(xs, ps, uncertainty(ps)[cfg.measure].cpu(), threshold, labels=labels,
                      path=out / "examples.png")
    return report


def write_json(obj, path):
    atomic_save(obj, path, write=lambda o, f: f.write(json.dumps(o, indent=2).encode() + b"\n"))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    """Run from the command line (or `main([...])` in-process); returns the metrics dict.

    Expected failures exit with one line on stderr: 1 for bad data, files or training,
    130/143 when interrupted by SIGINT/SIGTERM (a checkpoint is saved first).
    """
    cfg = parse_args(argv)
    try:
        return run(cfg)
    except Interrupted as e:
        print(f"{e}; checkpoint saved to {Path(cfg.out_dir) / 'checkpoint.pt'}: "
              f"run again with --resume to continue", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:  # Ctrl-C outside training (loading, evaluating, plotting)
        print(f"interrupted; what was already written to {cfg.out_dir} is kept", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except (DataError, TrainingDiverged, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
