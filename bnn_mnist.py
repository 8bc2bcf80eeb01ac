"""A Bayesian neural network on MNIST with Pyro: the 2018 tutorial, working and correct.

A 784-1024-10 ReLU network with a Normal(0, 1) prior on every weight, a mean-field Normal guide
with softplus scales, fitted by SVI (Trace_ELBO on `model` and `guide`) and Adam; predictions
average 10 posterior samples; the network says "I don't know" when its samples disagree. The
defaults depart from the article in a few places (docs/how-it-works.md; `--article` undoes them).

    python bnn_mnist.py --data-dir data               # train, report, write out/ (MNIST downloaded if missing)
    python bnn_mnist.py --epochs 2 --max-batches 20 --train-subset 5000 --ood none   # a smoke run
    python bnn_mnist.py predict my_digit.png          # your own images, with out/guide.pt
    python bnn_mnist.py serve                         # a page to draw on, http://127.0.0.1:8000/

    import bnn_mnist as bm                            # in a notebook (docs/tutorial.ipynb)
    net = bm.load_guide("out/guide.pt")               # a BNN holding its trained posterior
    probs = bm.predict_prob(bm.load_mnist("data", train=False)[0][:8], net)   # (8, 10)

Part I is the article step by step; II says "I don't know"; III goes beyond the article; IV
draws the figures; V is the plumbing; VI answers your own images; VII is the command line.
References: Blundell et al. 2015, "Weight Uncertainty in Neural Networks"; the 2018 articles
"Tutorial: Bayesian Neural Networks with Pyro" and "Making your Neural Network Say 'I Don't Know'".
"""

import argparse
import contextlib
import gzip
import io
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import kl_divergence

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import ClippedAdam

# torchvision, matplotlib, seaborn, tqdm and PIL are imported where used: `import bnn_mnist` is fast.

__all__ = [  # what the README, the notebook and a user's own code need; the rest is the module's plumbing
    "Config", "DEFAULTS", "ARTICLE", "ARTICLE_TRAIN", "Error", "ImageError", "load_mnist", "holdout_split", "BNN",
    "model", "guide", "make_svi", "train_epoch", "train", "sample_weights", "sample_logits", "sample_probs",
    "predict_prob", "predict", "plot", "sample_probs_local", "uncertainty", "median_probs", "max_median_prob",
    "refusal_rule", "article_rule", "rule_classes", "refuses", "predict_or_abstain", "local_reparam_loss",
    "pyro_predictive_prob", "evaluate", "auroc", "expected_calibration_error", "shifted_sets", "pixel_rarity",
    "rarity_score", "sample_probs_sets", "plot_reliability", "plot_coverage", "plot_histograms", "plot_examples",
    "plot_pixel_scales", "plot_shift", "save_guide", "load_guide", "load_notmnist", "load_fashion",
    "prepare_image", "answer", "describe", "predict_files", "make_server", "main"]

# -----------------------------------------------------------------------------
# Settings: every default is written here once; argparse (Part VII) reads them from here. How each
# was chosen: docs/contributing/choosing-defaults.md.


@dataclass
class Config:
    data_dir: str = "data"  # torchvision layout: DATA_DIR/MNIST/raw/*-ubyte
    out_dir: str = "out"  # every output goes here, with fixed names
    epochs: int = 5
    batch_size: int = 128
    lr: float = 5e-3  # Adam's initial learning rate
    lr_decay: float = 0.7  # the learning rate is multiplied by this over each epoch
    scale_lr_factor: float = 10.0  # the guide's scales (rho) learn this many times faster than the means
    hidden_size: int = 1024
    prior_scale: float = 1.0  # the article's Normal(0, 1) prior on every weight
    kl_weight: float = 0.01  # the KL term's weight in the training objective (make_svi); 1 is the article's ELBO
    kl_per_batch: bool = False  # the article: the whole KL counted once per minibatch (its batch NLL not scaled up)
    init: str = "torch"  # the guide's start: "torch" (nn.Linear's init, scales init_scale) or "article" (N(0, 1) draws)
    init_scale: float = 1e-3  # guide scales start small: the net starts near its init
    elbo: str = "trace"  # how SVI estimates it: "trace": Trace_ELBO (the article); "meanfield"; "local" (Part III)
    num_samples: int = 10  # posterior samples for the forced prediction (the article)
    average: str = "probs"  # the forced prediction averages the samples' "probs" (the predictive) or "logits" (article)
    unc_samples: int = 100  # posterior samples for uncertainty and abstention
    sampler: str = "local"  # how those are drawn: "local" (each image's own exact draws, fast) or "weights" (step 7)
    rule: str = "quantiles"  # the refusal rule: "quantiles" on held-out digits (Part II) or the article's "median"
    measure: str = "mutual_information"
    threshold: float | None = None  # None: a quantile of the measure on held-out training images,
    refuse_quantile: float = 0.98  # ... this one
    ambiguity_quantile: float = 0.965  # also refuse above this quantile of expected entropy (0: off)
    val_size: int = 5000  # training images held out to set the thresholds (not trained on)
    ood: str = "fashion,notmnist,noise"
    fashion_dir: str | None = None  # None: DATA_DIR/FashionMNIST/raw, then Debian's folder
    notmnist_dir: str | None = None  # None: DATA_DIR/notMNIST-459
    noise_count: int = 2000
    shift_size: int = 1000  # test digits per rotated / mirrored / overlaid set (each costs ~2 s per 1000)
    selective_measure: str = "max_prob"  # which digits to trust first: lowest AURC on held-out digits (baselines.py)
    seed: int = 0
    device: str = "auto"
    max_batches: int | None = None  # smoke runs: cap the minibatches per epoch
    train_subset: int | None = None  # smoke runs: train on the first N images only
    resume: bool = False
    no_plots: bool = False


DEFAULTS = Config()
CLASSES = 10

# The article's recipe as written (`--article`, or keyword arguments from Python): the whole KL once
# per minibatch, Adam at a constant 0.01, the guide started from N(0, 1) draws, all 60,000 digits, 10
# samples' logits averaged; its sequel's refusal: unless some class's median probability exceeds 0.2.
ARTICLE_TRAIN = {"elbo": "trace", "kl_weight": 1.0, "kl_per_batch": True, "lr": 0.01, "lr_decay": 1.0,
                 "scale_lr_factor": 1.0, "epochs": 5, "batch_size": 128}  # bm.train(net, x, y, **ARTICLE_TRAIN)
ARTICLE = ARTICLE_TRAIN | {"init": "article", "val_size": 0, "num_samples": 10, "average": "logits",
                           "unc_samples": 100, "rule": "median"}
ARTICLE_MEDIAN = 0.2  # the sequel's cut: some class's median sample probability must exceed it


class Error(Exception):
    """An expected failure (bad data, files or settings, a diverging run): the command line prints
    its one line and exits 1; anything else is a bug and keeps its traceback."""


# =============================================================================
# Part I. The article, step by step
# =============================================================================

# -----------------------------------------------------------------------------
# 1. Data: MNIST through torchvision, as in the article (which ran a PIL transform per image per
# step; one (N, 784) tensor is the same data, far cheaper). Parts I and II reach the plumbing
# (Part V) through one hook, `Plumbing`: data files, input checks, the training run's extras.


def load_mnist(data_dir, train=True, dataset="MNIST"):
    """One split of MNIST (or "FashionMNIST") from DATA_DIR/<dataset>/raw, downloaded if missing:
    x (N, 784) float32 in [0, 1], y (N,) int64. A missing or damaged file is an Error naming it."""
    import torchvision

    with Plumbing.data_files(data_dir, dataset, train) as (img, lbl):  # errors name the file (Part V)
        with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints its download attempts
            ds = getattr(torchvision.datasets, dataset)(str(data_dir), train=train, download=True)
        Plumbing.check_labelled(ds.data, ds.targets, img, lbl)  # what torchvision does not check
    return ds.data.reshape(len(ds.data), 784).float().div_(255), ds.targets.long()


# -----------------------------------------------------------------------------
# 2. The network: 784 -> 1024 (ReLU) -> 10, holding its own posterior q(w). The article kept
# q's parameters in Pyro's global param store; here each net holds (and saves, and moves) its own.

INITS = ("torch", "article")


def inverse_softplus(y):
    """The rho whose softplus is y (a float or a tensor of scales): y + log(1 - exp(-y)), stable for small y."""
    return y + (torch.log(-torch.expm1(-y)) if torch.is_tensor(y) else math.log(-math.expm1(-y)))


def bnn_forward(weights, x):
    """Logits (B, C) of one weight set {"fc1_weight": (H, D), ...} for x (B, 784), or (S, B, C) of S
    sets at once (a leading sample dim on every weight): one batched matmul, no Python loop."""
    h = torch.relu(x @ weights["fc1_weight"].mT + weights["fc1_bias"].unsqueeze(-2))  # (S, B, H)
    return h @ weights["out_weight"].mT + weights["out_bias"].unsqueeze(-2)  # (S, B, C)


class BNN(nn.Module):
    """The architecture and its mean-field posterior: q(w) = N(loc, softplus(rho)) per weight.

    net.loc / net.rho: {"fc1_weight": (H, D), "fc1_bias": (H,), "out_weight": (C, H), "out_bias": (C,)};
    net.prior_scale: the std of the model's Normal(0, s) prior, saved with the posterior.
    init="torch": nn.Linear's init, scales init_scale (an ordinary untrained net); "article":
    means and rho drawn from N(0, 1), as the article's guide starts. net(x): the mean net's logits.
    """

    def __init__(self, input_size=784, hidden_size=1024, output_size=10, init_scale=DEFAULTS.init_scale,
                 prior_scale=DEFAULTS.prior_scale, init=DEFAULTS.init):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        self.prior_scale = prior_scale  # the model's prior; saved with the guide, restored by load_guide
        layers = {"fc1": nn.Linear(input_size, hidden_size), "out": nn.Linear(hidden_size, output_size)}
        self.loc = nn.ParameterDict({f"{n}_{k}": p for n, m in layers.items() for k, p in m.named_parameters()})
        rho0 = inverse_softplus(init_scale)
        self.rho = nn.ParameterDict({k: nn.Parameter(torch.full_like(p, rho0)) for k, p in self.loc.items()})
        if init == "article":  # the article's guide: loc = randn, scale = softplus(randn)
            with torch.no_grad():
                for k in self.loc:
                    self.loc[k].normal_()
                    self.rho[k].normal_()
        self.register_buffer("trained", torch.tensor(False))  # set by train() and load_guide()
        self.rule = None  # when to say "I don't know" (Part II: refusal_rule); saved with the guide
        self.sizes = (input_size, hidden_size, output_size)

    @property
    def device(self):  # where the posterior lives (net.to(device) moves it)
        return self.loc["fc1_weight"].device

    def q(self, name):
        """The guide's distribution of one weight tensor."""
        return dist.Normal(self.loc[name], F.softplus(self.rho[name])).to_event(self.loc[name].dim())

    def forward(self, x):
        self.check_trained()
        return bnn_forward(dict(self.loc), Plumbing.to_images(x).to(self.device))  # the input checks of predict_prob

    def check_trained(self):
        if not bool(self.trained):
            raise Error("this BNN has no trained posterior: train it (bm.train) or load one (bm.load_guide)")


# -----------------------------------------------------------------------------
# 3. The model: p(w) p(y | x, w), Normal(0, prior_scale) on every weight and bias.


def model(x_data, y_data=None, num_data=None, *, net, prior_scale=None, kl_weight=1.0):
    """x_data: (B, 784); y_data: (B,) or None; num_data: training-set size. Returns logits (B, 10).

    With its defaults, the article's joint p(w) p(y | x, w), every site at scale 1 (for
    poutine.trace, an AutoGuide or NUTS). prior_scale: None is net.prior_scale. kl_weight
    scales the prior's (and the guide's) log-densities: the training objective's tempering.
    The data plate scales the minibatch log-likelihood by num_data / B, so one minibatch's ELBO
    estimates the full-data ELBO (num_data=None: the article's, the KL once per minibatch).
    """
    std = net.prior_scale if prior_scale is None else prior_scale
    weights = {}
    with poutine.scale(scale=kl_weight):
        for name, loc in net.loc.items():
            zero = loc.new_zeros(())
            # .to_event: a weight matrix is one draw of a (H, D)-shaped random variable
            weights[name] = pyro.sample(name, dist.Normal(zero, zero + std).expand(loc.shape).to_event(loc.dim()))
    logits = bnn_forward(weights, x_data)  # (B, 10)
    with pyro.plate("data", size=num_data or len(x_data), subsample=torch.arange(len(x_data), device=x_data.device)):
        pyro.sample("obs", dist.Categorical(logits=logits), obs=y_data)
    return logits


# -----------------------------------------------------------------------------
# 4. The guide: mean-field Normal, q(w) = prod N(loc, softplus(rho)), as in the article.


def register(net):
    """pyro.module("bnn", net): net.loc and net.rho become the Pyro params SVI optimises; outside
    `train` (its own param store) a second net would silently get the first net's tensors back."""
    pyro.module("bnn", net)
    if dict(pyro.get_param_store().named_parameters())["bnn$$$loc.fc1_weight"] is not net.loc["fc1_weight"]:
        raise ValueError("Pyro's param store holds another BNN's posterior: run SVI by hand inside "
                         "`with pyro.get_param_store().scope():` (as bm.train does), or pyro.clear_param_store()")


def guide(x_data=None, y_data=None, num_data=None, *, net, kl_weight=1.0):
    """Samples every weight from q; returns {name: weight}. The model's arguments but the prior's;
    kl_weight must be the model's, so that log q - log p is weighted alike."""
    register(net)
    with poutine.scale(scale=kl_weight):  # as in the model: log q - log p weighted alike
        return {name: pyro.sample(name, net.q(name)) for name in net.loc}


# -----------------------------------------------------------------------------
# 5. The optimizer and SVI. The training objective (make_svi and train; model and guide
# alone are the article's, kl_weight 1):
#     maximise  E_q[log p(D | w)] - kl_weight * KL(q(w) || p(w)),   kl_weight = 0.01
# With kl_weight 1 the guide's scales either barely leave their start in 5 epochs (the
# article's optimiser: the samples agree everywhere) or, learning 10x faster as here, widen
# all 814,090 weights toward the prior and cost accuracy (docs/how-it-works.md).

# How SVI estimates it (--elbo): Trace_ELBO samples the KL, as the article did; TraceMeanField_ELBO
# computes it exactly; Part III adds "local". Each: (net, prior_scale, kl_weight) -> SVI's loss.
ESTIMATORS = {"trace": lambda *settings: Trace_ELBO(), "meanfield": lambda *settings: TraceMeanField_ELBO()}


def make_svi(net, lr, lr_decay=1.0, prior_scale=None, elbo=DEFAULTS.elbo,
             scale_lr_factor=DEFAULTS.scale_lr_factor, kl_weight=DEFAULTS.kl_weight):
    """SVI with Adam on model and guide, the KL weighted by kl_weight (1.0: the article's ELBO).

    lr_decay multiplies the learning rate at every step. ClippedAdam is Adam with that decay
    kept in its own state, so a resumed run decays exactly like an uninterrupted one; clipping
    is off (clip_norm=inf). prior_scale: None uses net.prior_scale.
    """
    optim = ClippedAdam(lambda param_name: {
        "lr": lr * (scale_lr_factor if param_name.endswith(tuple(f"rho.{k}" for k in net.rho)) else 1.0),
        "lrd": lr_decay,
        "clip_norm": float("inf"),
    })
    loss = ESTIMATORS[elbo](net, prior_scale, kl_weight)
    svi = SVI(partial(model, net=net, prior_scale=prior_scale, kl_weight=kl_weight),
              partial(guide, net=net, kl_weight=kl_weight), optim, loss)
    return svi, optim


# -----------------------------------------------------------------------------
# 6. The training loop: the article's loop over shuffled minibatches. The progress bar,
# NaN checks, checkpoints and signals are the plumbing's (`Plumbing.TrainingRun`, Part V).


def train_epoch(svi, x_train, y_train, batch_size, state, steps, after_step=None, kl_per_batch=False):
    """One pass over the training set (N, 784), (N,); returns the summed loss / N (-ELBO per example).

    kl_per_batch: the article's loss, each minibatch's NLL (not scaled up) plus the whole KL.
    """
    num_data = len(x_train)
    if state["perm"] is None:  # a fresh epoch: reshuffle
        state["perm"] = torch.randperm(num_data, device=x_train.device)
    for step in range(state["step"], steps):
        idx = state["perm"][step * batch_size : (step + 1) * batch_size]
        # -ELBO of the whole training set, estimated from this minibatch (the article: None)
        loss = svi.step(x_train[idx], y_train[idx], None if kl_per_batch else num_data)
        state["loss_sum"] += loss / num_data
        state["step"] = step + 1
        if after_step is not None:
            after_step(state, loss)
    return state["loss_sum"] / steps


def train(net, x_train, y_train, *, epochs=DEFAULTS.epochs, batch_size=DEFAULTS.batch_size, lr=DEFAULTS.lr,
          lr_decay=DEFAULTS.lr_decay, scale_lr_factor=DEFAULTS.scale_lr_factor, prior_scale=None,
          kl_weight=DEFAULTS.kl_weight, elbo=DEFAULTS.elbo, kl_per_batch=DEFAULTS.kl_per_batch, max_batches=None,
          validate=False, progress=True, log=print, **plumbing):
    """Fit net's posterior by SVI; returns {"losses": per-epoch -ELBO per example, "train_seconds"}.

    prior_scale: None keeps net.prior_scale; a number sets it. kl_weight: the objective's
    tempering, E_q[log p(D | w)] - kl_weight * KL(q || p) (1: the article's ELBO).
    kl_per_batch: the article's loss (**ARTICLE_TRAIN gives its whole recipe). Pyro's param
    store is used only inside this call (a scope of its own), so nothing trained here leaks
    into other nets. `plumbing` (checkpoint_path, settings, resume_state, stop_requested) is
    handled by Plumbing.TrainingRun (Part V).
    """
    if prior_scale is not None:
        net.prior_scale = prior_scale
    if bool(net.trained) and plumbing.get("resume_state") is None:
        log("note: this net is trained already: training goes on from its posterior with a fresh Adam "
            "and learning-rate schedule (bm.BNN() starts a new one)")
    steps = math.ceil(len(x_train) / batch_size)
    steps = min(steps, max_batches) if max_batches else steps
    # lr_decay per epoch, applied smoothly at every step; it does not depend on `epochs`,
    # so 3 epochs and then 2 more with --resume are exactly 5 epochs.
    svi, optim = make_svi(net, lr, lr_decay ** (1 / steps), net.prior_scale, elbo, scale_lr_factor, kl_weight)
    run = Plumbing.TrainingRun(net, optim, steps, epochs, progress, log, **plumbing)  # Part V
    with pyro.get_param_store().scope(), pyro.validation_enabled(validate), run.reporting_nan():
        state = run.start()
        while state["epoch"] < epochs:
            loss = train_epoch(svi, x_train, y_train, batch_size, state, steps, run.after_step, kl_per_batch)
            run.end_epoch(loss)
    return run.finish()


# -----------------------------------------------------------------------------
# 7. Prediction: sample 10 networks from the posterior and average their class
# probabilities. The article averaged logits (average="logits"), which is not the posterior
# predictive: two samples that are sure of different classes should give "either", not "neither".


def check_num_samples(num_samples):
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")


def sample_weights(net, num_samples):
    """num_samples weight sets drawn from q in one vectorised call: {name: (S, ...)}."""
    return {name: net.q(name).sample((num_samples,)) for name in net.loc}


def chunk_sizes(net, num_samples, num_images, max_elements):
    """Weight sets and images per chunk, so that neither the sampled weights (s, ...) nor the
    hidden activations (s, b, H) exceed max_elements floats (128 MiB by default), whatever S
    and B are (as long as max_elements holds one weight set: 814k floats)."""
    hidden = net.sizes[1]
    weight_set = sum(p.numel() for p in net.loc.values())
    s_chunk = max(1, min(num_samples, max_elements // weight_set, max_elements // (hidden * min(num_images, 1024))))
    return s_chunk, max(1, max_elements // (hidden * s_chunk))


def sample_logits(x, net, num_samples=DEFAULTS.num_samples, max_elements=2**25):
    """The logits of num_samples weight sets drawn from q, each run on every image: (S, B, 10)."""
    check_num_samples(num_samples)
    net.check_trained()
    x = Plumbing.to_images(x).to(net.device)
    s_chunk, b_chunk = chunk_sizes(net, num_samples, len(x), max_elements)  # memory bound, see below
    chunks = []
    with torch.no_grad():
        for s in range(0, num_samples, s_chunk):
            weights = sample_weights(net, min(s_chunk, num_samples - s))  # s weight sets: {name: (s, ...)}
            chunks.append(torch.cat([bnn_forward(weights, x[b : b + b_chunk]) for b in range(0, len(x), b_chunk)], 1))
    return torch.cat(chunks)  # (S, B, 10)


def sample_probs(x, net, num_samples=DEFAULTS.num_samples, max_elements=2**25):
    """Class probabilities of each posterior sample: (S, B, 10), on the net's device."""
    return sample_logits(x, net, num_samples, max_elements).softmax(-1)


def predict_prob(x, net, num_samples=DEFAULTS.num_samples, average=DEFAULTS.average):
    """Posterior predictive p(y | x): the mean of num_samples samples' probabilities, (B, 10).

    average="logits" is the article's: the softmax of the samples' mean logits.
    """
    logits = sample_logits(x, net, num_samples)  # (S, B, 10)
    if average == "logits":
        return logits.mean(0).softmax(-1)
    if average != "probs":
        raise ValueError(f"average must be 'probs' or 'logits', got {average!r}")
    return logits.softmax(-1).mean(0)


def predict(x, net, num_samples=DEFAULTS.num_samples, average=DEFAULTS.average):
    """The class the network is forced to predict: argmax of predict_prob, (B,)."""
    return predict_prob(x, net, num_samples, average).argmax(-1)


# -----------------------------------------------------------------------------
# 8. The plot: the digit beside a bar chart of its class probabilities. Every figure of the
# module (Part IV too) is built by _figure and saved or shown by _finish.


def normalize(x):
    """The article's min-max scaling to [0, 1]; here it scales the digit shown by `plot`."""
    x = torch.as_tensor(x, dtype=torch.float)
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def _figure(nrows=1, ncols=1, figsize=(8, 3.5), **kw):
    import seaborn as sns
    from matplotlib.figure import Figure

    sns.set_theme(style="whitegrid", context="notebook")
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def atomic_write(path, write):
    """write(file) to a temporary file beside path, then rename it: path is never half-written."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise Error(f"could not save {path}: {e.strerror or e} (the previous file is kept)") from None
        raise


def _finish(fig, path):
    """Save fig to path (whole or not at all), else show it in a notebook; returns fig."""
    if path is not None:
        fmt = Path(path).suffix.lstrip(".") or "png"
        atomic_write(path, lambda f: fig.savefig(f, dpi=110, format=fmt))
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


def _digit(ax, image, title=None, **imshow):
    """A 28 x 28 image on ax, without ticks or grid (a digit in [0, 1] unless imshow says otherwise)."""
    shown = ax.imshow(image.reshape(28, 28).cpu().numpy(), **({"cmap": "gray_r", "vmin": 0, "vmax": 1} | imshow))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title, fontsize=10)
    return shown


def plot(x, probs, label=None, path=None, generator=None):
    """The article's figure for one image (784,), (28, 28) or (1, 28, 28).

    probs: (S, 10) sample probabilities (bars: their mean; whiskers: the 5-95% spread;
    dots: the samples) or (10,). Saved to path if given, else shown; returns the figure.
    generator: the dots' horizontal jitter (default: a fixed one; the global RNG is left alone).
    """
    x, probs = torch.as_tensor(x).detach().cpu(), torch.as_tensor(probs, dtype=torch.float).detach().cpu()
    if x.numel() != 784:
        raise ValueError(f"plot takes one 28x28 image, got shape {tuple(x.shape)}")
    image, probs = Plumbing.to_images(x.reshape(1, 784))[0], probs[None] if probs.dim() == 1 else probs  # (784,), (S, 10)
    if probs.dim() != 2 or probs.shape[1] != CLASSES:
        raise ValueError(f"probs must have shape (S, 10) or (10,), got {tuple(probs.shape)}")
    mean = probs.mean(0)
    pred = int(mean.argmax())
    fig, axes = _figure(1, 2, figsize=(8, 3.2), width_ratios=[1, 2.6])
    _digit(axes[0, 0], normalize(image), ("" if label is None else f"truth {int(label)}, ") + f"predicted {pred}")
    ax = axes[0, 1]
    colors = ["#c44e52" if c == pred else "#4c72b0" for c in range(CLASSES)]
    ax.bar(range(CLASSES), mean.numpy(), color=colors, alpha=0.85, label="mean over samples")
    if len(probs) > 1:
        # the 5-95% spread as a line of its own: a skewed spread can leave the mean outside it
        lo, hi = probs.quantile(0.05, 0), probs.quantile(0.95, 0)
        ax.vlines(range(CLASSES), lo.numpy(), hi.numpy(), color="black", lw=1, label="5-95% of samples")
        jitter = (torch.rand(probs.shape, generator=generator or torch.Generator().manual_seed(0)) - 0.5) * 0.4
        ax.scatter((torch.arange(CLASSES) + jitter).flatten().numpy(), probs.flatten().numpy(), s=4, color="black",
                   alpha=0.25, label=f"{len(probs)} posterior samples")
    ax.set(xticks=range(CLASSES), ylim=(0, 1.02), xlabel="class", ylabel="predictive probability",
           title=f"p(class | image), mean {mean[pred]:.2f} for {pred}")
    ax.legend(loc="upper left", fontsize=8)
    return _finish(fig, path)



# =============================================================================
# Part II. Saying "I don't know": uncertainty from the (S, B, 10) sample probabilities.
# Every measure is "higher = more uncertain". The network refuses when its samples disagree
# (mutual information: "I have not seen anything like this") or agree that the image is
# ambiguous (expected entropy: "a 4 or a 9"); each threshold is a quantile of the measure
# on held-out training images, computed in every run (`refusal_rule`).
# =============================================================================

def holdout_split(x, y, val_size=DEFAULTS.val_size, seed=1234):
    """Hold out val_size training images, never to be trained on: (x_train, y_train, x_val, y_val).

    The held-out images set the refusal thresholds (`refusal_rule`, Part II) and choose the
    defaults. The draw depends on `seed` only (the same for every training seed).
    """
    if not 0 <= val_size < len(x):
        raise Error(f"val_size {val_size} must lie in [0, {len(x)}): the set has {len(x)} images")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, tr = perm[:val_size], perm[val_size:]
    return x[tr], y[tr], x[val], y[val]


# -----------------------------------------------------------------------------
# Many samples of many images. Saying "I don't know" needs 100 samples of every image, and
# weight-set sampling (step 7) pays a 784x1024 matrix product per sample. Under the
# mean-field q it need not: for one image x, the hidden pre-activations are exactly Normal,
# mean x loc^T + loc_b and variance x^2 scale^2^T + scale_b^2, independently per unit (the
# local reparameterization trick, Kingma et al. 2015). So each image's S samples are exact:
# two matrix products, S Normal draws of its H pre-activations, S output-layer weight sets.
# Images are coupled differently than by weight sets, which numbers over many images (an
# AUROC) would feel if all shared S noise vectors; so each image takes its own S rows, from
# a random offset, of a pool of Normal vectors many times larger than S.


def sample_logits_local(x, net, num_samples=DEFAULTS.unc_samples, generator=None, max_elements=2**21):
    """The logits of num_samples exact per-image posterior draws: (S, B, 10).

    generator: a torch.Generator for the draws (default: the global RNG). Works in blocks of at
    most max_elements hidden activations (8 MiB by default).
    """
    check_num_samples(num_samples)
    net.check_trained()
    x, S = Plumbing.to_images(x).to(net.device), num_samples
    with torch.no_grad():
        scale = {k: F.softplus(r) for k, r in net.rho.items()}
        mean = torch.addmm(net.loc["fc1_bias"], x, net.loc["fc1_weight"].mT)  # (B, H)
        std = (x.square() @ scale["fc1_weight"].square().mT + scale["fc1_bias"].square()).sqrt_()  # (B, H)
        B, H = mean.shape
        draw = partial(torch.randn, device=x.device, generator=generator)
        # (P, H): image b's sample s is row offset[b] + s; up to 64 S rows (16 MiB), fewer for a few images
        pool = draw(S + max(S, min(63 * S, B * S, 2**22 // H)), H)
        offset = torch.randint(len(pool) - S + 1, (B,), device=x.device, generator=generator)
        out_w = net.loc["out_weight"] + scale["out_weight"] * draw(S, *net.loc["out_weight"].shape)  # (S, C, H)
        out_b = net.loc["out_bias"] + scale["out_bias"] * draw(S, *net.loc["out_bias"].shape)  # (S, C)
        out = torch.empty(S, B, out_b.shape[1], device=x.device)  # (S, B, C)
        rows = max(1, min(B, 2**19 // H))  # blocks of (k samples, rows images, H) activations, in cache
        k = max(1, min(S, max_elements // (rows * H)))
        buffer = torch.empty(k * rows * H, device=x.device)
        for b in range(0, B, rows):
            m, sd, off = mean[b : b + rows], std[b : b + rows], offset[b : b + rows]
            for s in range(0, S, k):
                ks = min(k, S - s)
                idx = (off + torch.arange(s, s + ks, device=x.device)[:, None]).flatten()  # (ks * rows,)
                h = torch.index_select(pool, 0, idx, out=buffer[: len(idx) * H].view(-1, H)).view(ks, len(m), H)
                torch.addcmul(m, sd, h, out=h).relu_()  # (ks, rows, H): the hidden units of each image
                out[s : s + ks, b : b + rows] = torch.baddbmm(out_b[s : s + ks, None], h, out_w[s : s + ks].mT)
    return out


def sample_probs_local(x, net, num_samples=DEFAULTS.unc_samples, generator=None):
    """Class probabilities of num_samples exact per-image posterior draws: (S, B, 10), like sample_probs."""
    return sample_logits_local(x, net, num_samples, generator).softmax(-1)


SAMPLERS = ("local", "weights")  # Config.sampler, --sampler


def sampler_for(name):
    """The function that draws (S, B, 10) sample probabilities for a sampler's name."""
    return {"local": sample_probs_local, "weights": sample_probs}[name]


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


def median_probs(probs):
    """Each class's median over the samples (S, B, 10) -> (B, 10), as the article's NumPy
    percentile(50) takes it: the middle sample, or the mean of the two middle ones when S is even."""
    s, n = probs.sort(0).values, len(probs)
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def max_median_prob(probs):
    """The article's score: the highest class median, (B,). Lower = more uncertain."""
    return median_probs(probs).max(-1).values


def scores_for(probs, rule):
    """uncertainty(probs), and the article's max_median_prob when the rule uses it."""
    u = uncertainty(probs)
    if "max_median_prob" in rule:
        u["max_median_prob"] = max_median_prob(probs)
    return u


def article_rule():
    """The sequel's refusal rule: refuse unless some class's median sample probability exceeds 0.2."""
    return {"max_median_prob": ARTICLE_MEDIAN}


def rule_classes(probs, rule):
    """The class each image is answered with, (B,): the highest class median under the article's
    rule (its sequel answered so), else the argmax of the mean probabilities."""
    return (median_probs(probs) if "max_median_prob" in rule else probs.mean(0)).argmax(-1)


def thresholds(u, quantiles):
    """{measure: its quantile q over the images of u (uncertainty()'s dict)} for {measure: q}."""
    return {m: float(torch.quantile(u[m].double(), q)) for m, q in quantiles.items()}


def refusal_rule(x_val, net, measure=DEFAULTS.measure, quantile=DEFAULTS.refuse_quantile,
                 ambiguity_quantile=DEFAULTS.ambiguity_quantile, num_samples=DEFAULTS.unc_samples,
                 sampler=DEFAULTS.sampler):
    """When to say "I don't know": {measure: threshold}, each a quantile over held-out images.

    `measure` above its `quantile`, or (unless ambiguity_quantile is 0) expected entropy
    above its own quantile. When `measure` is expected entropy itself, that second half
    would be the same test: `quantile` alone sets it. x_val: images the net was not
    trained on, (N, 784). sampler: "local" (sample_probs_local) or "weights" (sample_probs).
    """
    u = uncertainty(sampler_for(sampler)(x_val, net, num_samples))
    quantiles = {measure: quantile}
    if ambiguity_quantile and measure != "expected_entropy":
        quantiles["expected_entropy"] = ambiguity_quantile
    return thresholds(u, quantiles)


def refuses(u, rule):
    """(B,) True where any measure of u (scores_for()'s dict) exceeds its threshold in rule.

    The article's max_median_prob works the other way round: refused unless it exceeds its cut.
    """
    return torch.stack([u[m] <= t if m == "max_median_prob" else u[m] > t for m, t in rule.items()]).any(0)


def predict_or_abstain(x, net, rule=None, num_samples=DEFAULTS.unc_samples):
    """The class, or -1 ("I don't know") where the refusal rule says so: (B,) int64.

    rule defaults to the one saved with the net's guide (`load_guide`); for a net you
    trained, make one with `refusal_rule(x_val, net)`.
    """
    rule = rule if rule is not None else net.rule
    if not rule:
        raise ValueError("no refusal rule: pass rule=, e.g. bm.refusal_rule(x_val, net) on held-out images")
    probs = sample_probs_local(x, net, num_samples)  # (S, B, 10)
    return torch.where(refuses(scores_for(probs, rule), rule), -1, rule_classes(probs, rule))

# =============================================================================
# Part III. Beyond the article: a faster estimator of the same objective, Pyro's own
# Predictive, and the numbers a run reports (calibration, abstention, shifted and foreign
# images, and a model-free control).
# =============================================================================

# -----------------------------------------------------------------------------
# The local reparameterization trick for training (--elbo local).


def local_reparam_loss(model, guide, x_data, y_data, num_data=None, *, net, prior_scale=None,
                       kl_weight=DEFAULTS.kl_weight):
    """The same -ELBO as Trace_ELBO on (model, guide), estimated with less noise (--elbo local).

    The local reparameterization trick (Kingma, Salimans and Welling 2015): under the
    mean-field q, each image's pre-activations h W^T + b are Normal with mean h loc^T + loc_b
    and variance h^2 scale^2^T + scale_b^2, so each image draws its own (B, H) and (B, C)
    instead of sharing one weight set; the KL is exact, as in TraceMeanField_ELBO. Pyro's SVI
    takes it as a loss callable (it calls it with model and guide first, which this estimator
    does not need: it reads q and the prior's scale from the net).
    """
    register(net)  # net.loc / net.rho are the Pyro params SVI steps
    scale = {k: F.softplus(r) for k, r in net.rho.items()}
    std = net.prior_scale if prior_scale is None else prior_scale
    prior = {k: dist.Normal(loc.new_zeros(()), std) for k, loc in net.loc.items()}
    kl = sum(kl_divergence(dist.Normal(loc, scale[k]), prior[k]).sum() for k, loc in net.loc.items())

    def layer(name, h):  # h: (B, in) -> one draw of (B, out) per image
        mean = h @ net.loc[f"{name}_weight"].mT + net.loc[f"{name}_bias"]
        var = h.square() @ scale[f"{name}_weight"].square().mT + scale[f"{name}_bias"].square()
        return mean + var.sqrt() * torch.randn_like(mean)

    logits = layer("out", torch.relu(layer("fc1", x_data)))  # (B, 10)
    nll = F.cross_entropy(logits, y_data, reduction="sum") * (num_data or len(x_data)) / len(x_data)
    return nll + kl_weight * kl

ESTIMATORS["local"] = lambda net, prior_scale, kl_weight: partial(local_reparam_loss, net=net,
                                                                  prior_scale=prior_scale, kl_weight=kl_weight)
ELBOS = tuple(ESTIMATORS)  # --elbo's choices


def pyro_predictive_prob(x, net, num_samples=DEFAULTS.num_samples):
    """A demonstration of Pyro's own tool, `Predictive` (guide, then model): the same (B, 10)
    posterior predictive as predict_prob, computed the Pyro way.

    A demonstration: it draws all num_samples weight sets at once (S x 814k floats at the
    defaults), where sample_probs bounds its memory.
    """
    net.check_trained()
    predictive = Predictive(partial(model, net=net), guide=partial(guide, net=net), num_samples=num_samples,
                            return_sites=["_RETURN"], parallel=True)  # all samples in one vectorised pass
    with torch.no_grad(), pyro.get_param_store().scope():
        logits = predictive(Plumbing.to_images(x).to(net.device))["_RETURN"]  # (S, B, 10)
    return logits.softmax(-1).mean(0)

# -----------------------------------------------------------------------------
# The numbers of a run: accuracy and calibration of the mean probabilities (B, 10),
# abstention, selective prediction, telling foreign images apart.


def abstention(refused, correct):
    """Coverage (fraction accepted), the fraction refused and the accuracy on the accepted."""
    accepted = ~refused
    n = int(accepted.sum())
    return {
        "coverage": n / len(refused),
        "refused": 1 - n / len(refused),
        "accuracy_accepted": float(correct[accepted].float().mean()) if n else float("nan"),
    }


def accuracy_coverage_curve(score, correct):
    """Accept the k most certain images, k = 1..B: (coverage, accuracy) arrays of length B."""
    order = torch.argsort(score, stable=True)
    hits = correct[order].float().cumsum(0)
    k = torch.arange(1, len(score) + 1, dtype=torch.float, device=hits.device)
    return k / len(score), hits / k


def auroc(score_in, score_out):
    """Area under the ROC of telling out- from in-distribution by score (higher = out).

    The Mann-Whitney statistic with ties counted half: 1.0 = perfectly separated,
    0.5 = no better than chance (identical scores).
    """
    scores = torch.cat([score_in, score_out.to(score_in.device)]).double()
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=torch.double, device=scores.device)
    uniq, inverse = torch.unique(scores, return_inverse=True)  # average ranks over ties
    ranks = torch.zeros(len(uniq), dtype=torch.double, device=scores.device).index_add_(0, inverse, ranks)
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
# Harder questions than "is this a digit at all?". Foreign images (clothes, letters, noise)
# put ink where digits never do, so a pixel counter with no model in it already spots
# them (`pixel_rarity`): the control every AUROC is reported beside. The sets below keep
# the digits' own pixels (near-OOD), shift them gradually (rotation, as in Ovadia et al.
# 2019, "Can you trust your model's uncertainty?"), or ask which digits to trust at all
# (selective prediction). All are built from labelled digits: held-out training digits to
# choose settings, test digits to report.

SHIFT_ANGLES = (0, 15, 30, 45, 60, 90, 135, 180)
NEAR_OOD = ("rotated 90", "rotated 180", "mirrored", "overlaid")


def rotate(x, degrees):
    """Images (B, 784) turned counter-clockwise by `degrees` about their centre, (B, 784).

    Multiples of 90 degrees move pixels exactly; other angles interpolate bilinearly.
    """
    img = x.reshape(-1, 1, 28, 28)
    if degrees % 90 == 0:
        return torch.rot90(img, int(degrees // 90) % 4, dims=(2, 3)).reshape(-1, 784)
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    # affine_grid maps output to input coordinates (x right, y down): the inverse rotation
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=x.dtype, device=x.device).expand(len(img), 2, 3)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, align_corners=False).clamp(0, 1).reshape(-1, 784)


def mirror(x):
    """Images (B, 784) flipped left to right."""
    return x.reshape(-1, 28, 28).flip(-1).reshape(-1, 784)


def overlay(x, y, n, seed=0):
    """n images, each the pixel-wise max of two digits of different classes: (n, 784)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(len(x), (2, 4 * n), generator=g).to(x.device)
    keep = (y[a] != y[b]).nonzero().squeeze(1)[:n]  # (n,): 90% of random pairs differ
    return torch.maximum(x[a[keep]], x[b[keep]])


def shifted_sets(x, y, n=DEFAULTS.shift_size, seed=0):
    """Rotation shift and near-OOD sets from n labelled digits (a fixed draw of x, y).

    Returns (pick, {angle: (n, 784)} for SHIFT_ANGLES, {name: images} for NEAR_OOD): the
    digits x[pick] (labels y[pick]) are the 0 degree set; the near-OOD rotations are the
    shift's 90 and 180 degree sets (the same tensors).
    """
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: min(n, len(x))].to(x.device)
    shift = {a: rotate(x[pick], a) for a in SHIFT_ANGLES}
    near = {"rotated 90": shift[90], "rotated 180": shift[180], "mirrored": mirror(x[pick]),
            "overlaid": overlay(x, y, len(pick), seed + 1)}
    return pick, shift, near


def sets_to_score(shift, near):
    """The near-OOD sets and every other rotation, each set once, the rotations named
    "rotated A" (0 degrees left out: those are the digits themselves)."""
    return near | {f"rotated {a}": v for a, v in shift.items() if a != 0 and f"rotated {a}" not in near}


def by_angle(probs, pick, digits="MNIST"):
    """{angle: (S, n, 10)} for SHIFT_ANGLES, from the probabilities of sets_to_score's sets
    and of the digits (named `digits`), of which pick were rotated."""
    return {a: probs[digits][:, pick] if a == 0 else probs[f"rotated {a}"] for a in SHIFT_ANGLES}


def pixel_rarity(x_train):
    """The control's table: how often training digits ink each pixel, (784,) in [0, 1]."""
    return (x_train > 0).float().mean(0)


def rarity_score(x, freq):
    """A model-free OOD score: ink weighted by how rarely digits ink each pixel, (B,)."""
    return (x / (freq.to(x.device) + 1e-4)).sum(1)


def risk_coverage(score, correct, keep=0.95):
    """Selective prediction by one score (lower = more certain) over (B,) images.

    accuracy_kept: accuracy on the `keep` most certain; aurc: the area under the
    risk-coverage curve, the mean over k of the error rate of the k most certain
    (lower is better; lowest when every error is ranked after every right answer).
    """
    _, acc = accuracy_coverage_curve(score, correct)
    k = max(1, round(keep * len(score)))
    return {"accuracy_kept": float(acc[k - 1]), "aurc": float((1 - acc).mean())}


def shift_report(probs, y):
    """Accuracy, NLL, ECE and mean mutual information for each angle's (S, n, 10) probs."""
    return {a: evaluate(p.mean(0), y) | {"mutual_information": float(uncertainty(p)["mutual_information"].mean())}
            for a, p in probs.items()}


def sample_probs_sets(sets, net, num_samples=DEFAULTS.unc_samples, sampler=DEFAULTS.sampler):
    """Sample probabilities of several sets {name: (N_i, 784)} in one pass: {name: (S, N_i, 10)}.

    The same posterior samples score every set (one draw, not one per set), so sets are
    comparable. sampler: "local" (sample_probs_local) or "weights" (sample_probs).
    """
    names, sizes = list(sets), [len(v) for v in sets.values()]
    probs = sampler_for(sampler)(torch.cat([v.to(net.device) for v in sets.values()]), net, num_samples)
    return dict(zip(names, probs.split(sizes, dim=1)))


# =============================================================================
# Part IV. Figures: each builds its own figure, saves it to `path` when given, else
# shows it in a notebook; returns the figure. matplotlib/seaborn are imported here.
# =============================================================================


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
    ax.set(xlabel="confidence (max mean probability)", ylabel="accuracy",
           title=f"Reliability, MNIST test (ECE {ece:.4f})")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[0, 1]
    ax.bar(centers, count, width=width * 0.9, color="#55a868")
    ax.set(yscale="log", xlabel="confidence", ylabel="images (log scale)", title="Images per confidence bin")
    return _finish(fig, path)


def plot_coverage(score, correct, refused, measure, path=None):
    """Accuracy on the accepted images against coverage by one measure; the refusal rule's point marked."""
    cov, acc = (t.cpu().numpy() for t in accuracy_coverage_curve(score, correct))
    point = abstention(refused, correct)
    fig, axes = _figure(figsize=(6, 4))
    ax = axes[0, 0]
    ax.plot(cov, acc, color="#4c72b0", label=f"accept the most certain by {measure}")
    ax.scatter([point["coverage"]], [point["accuracy_accepted"]], color="#c44e52", zorder=3,
               label=f"the refusal rule: {point['coverage']:.1%} kept, "
                     f"{point['accuracy_accepted']:.2%} right")
    ax.set(xlabel="coverage (fraction of MNIST test images accepted)", ylabel="accuracy on accepted images",
           ylim=(max(0.9, float(acc.min()) - 0.005), 1.001), title="Accuracy versus coverage")
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
    marks = [] if threshold is None else [threshold]  # None: a rule on another score (the article's)
    # a score of 0 is drawn at lo: the smallest score above 0, and a decade left of the threshold's line
    smallest = min([everything[everything > 0].min(initial=np.inf), *(t / 10 for t in marks)])
    lo = max(1e-6, smallest) if smallest < np.inf else 1e-6  # every score 0 and no threshold: any decade will do
    hi = max([*marks, everything.max(), 10 * lo]) * 1.05  # at least a decade, also when every score is 0
    edges = np.logspace(np.log10(lo), np.log10(hi), 60)  # edges[0] may round off lo: clip the scores to it
    for name, v in values.items():
        ax.hist(np.clip(v, edges[0], None), bins=edges, histtype="stepfilled", alpha=0.35, density=False,
                weights=np.full(len(v), 1 / len(v)), label=f"{name} ({len(v)} images)")
    for t in marks:
        ax.axvline(t, color="black", ls="--", lw=1, label=f"threshold {t:.3g}: refuse to the right")
    unit = " (nats)" if measure != "max_prob" else " (1 - max probability)"
    ax.set(xscale="log", xlabel=measure.replace("_", " ") + unit, ylabel="fraction of images",
           title="Uncertainty: in- versus out-of-distribution")
    ax.legend(fontsize=8, loc="upper left")
    return _finish(fig, path)


def plot_examples(x, probs, score, refused, labels=None, path=None, ncols=6):
    """A grid of images, each above its per-class sample spread, accepted/refused marked.

    x: (N, 784); probs: (S, N, 10); score (shown) and refused: (N,).
    """
    n = x.shape[0]
    nrows = math.ceil(n / ncols)
    fig, axes = _figure(2 * nrows, ncols, figsize=(2.1 * ncols, 3.6 * nrows), height_ratios=[1.2, 1] * nrows)
    for i in range(nrows * ncols):
        top, bottom = axes[2 * (i // ncols), i % ncols], axes[2 * (i // ncols) + 1, i % ncols]
        if i >= n:
            top.axis("off")
            bottom.axis("off")
            continue
        p = probs[:, i].cpu()
        verdict = "refused" if refused[i] else f"says {int(p.mean(0).argmax())}"
        truth = f" (true {int(labels[i])})" if labels is not None and labels[i] >= 0 else ""
        _digit(top, x[i], f"{verdict}{truth}")
        for spine in top.spines.values():
            spine.set(visible=True, color="#c44e52" if refused[i] else "#55a868", linewidth=3)
        bottom.boxplot(p.numpy(), positions=range(CLASSES), widths=0.6, showfliers=False)
        bottom.set(ylim=(-0.02, 1.02), xticks=range(CLASSES))
        bottom.tick_params(labelsize=7)
        bottom.set_xlabel(f"class (score {float(score[i]):.2g})", fontsize=8)
        if i % ncols == 0:
            bottom.set_ylabel("p over samples", fontsize=8)
    fig.suptitle("Posterior samples per class; red frame: \"I don't know\", green: accepted")
    return _finish(fig, path)


def plot_pixel_scales(net, freq, path=None):
    """The mechanism: how unsure the posterior is about each input pixel's weights, beside
    how often training digits ink that pixel.

    Left: the median over the hidden units of the first layer's posterior std (28 x 28).
    Where digits never put ink, the likelihood says nothing about a weight, so q keeps it
    wide (toward the prior); ink landing there makes the samples disagree. Right: freq (784,),
    the fraction of training digits inking each pixel (`pixel_rarity`).
    """
    from matplotlib.colors import LogNorm

    scale = F.softplus(net.rho["fc1_weight"].detach()).median(0).values.cpu()  # (784,)
    fig, axes = _figure(1, 2, figsize=(8.5, 3.9))
    for ax, image, title, cmap, norm in (
            (axes[0, 0], scale, "posterior std of the pixel's weights\n(median over hidden units, log scale)",
             "magma", LogNorm()),
            (axes[0, 1], freq.cpu(), "fraction of training digits\ninking the pixel", "Greys", None)):
        fig.colorbar(_digit(ax, image, title, cmap=cmap, norm=norm, vmin=None, vmax=None), ax=ax, shrink=0.85)
    return _finish(fig, path)


def plot_shift(results, path=None):
    """Accuracy and ECE against the rotation angle of the test digits, one line per system.

    results: {system: {angle: {"accuracy": ..., "ece": ...}}} (shift_report's dict per system).
    """
    fig, axes = _figure(1, 2, figsize=(10, 3.8))
    for name, by_angle in results.items():
        angles = [float(a) for a in by_angle]
        for ax, key in zip(axes[0], ("accuracy", "ece")):
            ax.plot(angles, [r[key] for r in by_angle.values()], "o-", ms=4, label=name)
    axes[0, 0].set(xlabel="rotation (degrees)", ylabel="accuracy", ylim=(0, 1.01), title="Accuracy under rotation")
    axes[0, 1].set(xlabel="rotation (degrees)", ylabel="ECE (15 bins)", ylim=(0, None),
                   title="Calibration error under rotation")
    axes[0, 1].legend(fontsize=8, loc="upper left")
    return _finish(fig, path)


# =============================================================================
# Part V. Plumbing: data files, the training hook (checkpoints, signals, divergence),
# saving and loading, memory tuning, the command line's settings.
# =============================================================================

# -----------------------------------------------------------------------------
# Input checks and MNIST's files: what the article's steps call through `Plumbing`.



def to_images(x):
    """Images as the network's input, (B, 784) float32 in [0, 1]: from (B, 784), (B, 28, 28) or
    (B, 1, 28, 28), a tensor or array, floats in [0, 1] or uint8 (0-255). Anything else (one
    image, other shapes or dtypes, NaN, values out of range, no images) is a ValueError."""
    if not isinstance(x, torch.Tensor):  # a tensor stays where it is (as_tensor would move it to the default device)
        if any(s < 0 for s in getattr(x, "strides", ())):  # a flipped NumPy view (np.fliplr): torch needs a copy
            x = x.copy()
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"images must be a tensor or array, got {type(x).__name__}: {e}") from None
    if tuple(x.shape) in ((784,), (28, 28)):
        raise ValueError(f"got one image of shape {tuple(x.shape)}: pass a batch, e.g. x[None]")
    if x.dim() < 2 or x.shape[1:] not in ((784,), (28, 28), (1, 28, 28)):
        raise ValueError(f"images must have shape (B, 784), (B, 28, 28) or (B, 1, 28, 28), got {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError("empty batch: no images to predict")
    if x.dtype == torch.uint8:
        return x.reshape(len(x), 784).float() / 255
    if not x.is_floating_point():
        raise ValueError(f"images must be float in [0, 1] or uint8 in 0-255, got dtype {x.dtype}")
    x = x.float().reshape(len(x), 784)
    if torch.isnan(x).any():
        raise ValueError("images contain NaN pixels")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"pixel values must lie in [0, 1], got [{x.min().item():.4g}, {x.max().item():.4g}]: "
                         f"divide 0-255 images by 255 (or pass them as uint8)")
    return x


MNIST_FILES = {  # split -> (images, labels), torchvision's names
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def mnist_error(raw, train, e):
    """Why torchvision could not open a split: a file missing (and no download) or damaged."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    missing = [n for pair in MNIST_FILES.values() for n in pair if not (raw / n).exists()]
    reason = ([line.strip("<> ") for line in str(e).splitlines() if line.strip()] or [type(e).__name__])[-1]
    if missing:
        return (f"no {raw.parent.name} file {missing[0]} in {raw} and the download failed ({reason}); put the four "
                f"*-ubyte files there, or point --data-dir at a folder holding {raw.parent.name}/raw/")
    for name, read in zip(MNIST_FILES[train], (read_image_file, read_label_file)):
        try:  # torchvision's own readers: a bare AssertionError names no file, so name it here
            read(str(raw / name))
        except Exception:
            return f"{raw / name} is not an MNIST IDX file: damaged or truncated"
    return f"cannot read {raw.parent.name} in {raw}: {reason}"


def check_labelled(images, labels, img_path, lbl_path):
    """The checks torchvision lacks: 28x28 images (N, 28, 28), as many labels (N,), labels 0-9."""
    if images.dim() != 3 or images.shape[1:] != (28, 28):
        raise Error(f"{img_path} holds images of shape {tuple(images.shape[1:])}, not 28x28")
    if len(images) == 0:
        raise Error(f"{img_path} holds no images")
    if len(images) != len(labels):
        raise Error(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    if len(labels) and labels.max() >= CLASSES:
        raise Error(f"{lbl_path} has a label {int(labels.max())}, outside 0-9")


@contextlib.contextmanager
def data_files(data_dir, dataset, train):
    """Around torchvision's opening of a split: yields its (images, labels) paths; a failure
    becomes an Error that names the missing or damaged file."""
    raw = Path(data_dir) / dataset / "raw"
    try:
        yield tuple(raw / name for name in MNIST_FILES[train])
    except Error:
        raise
    except Exception as e:  # no network, a damaged file: one line, no traceback
        raise Error(mnist_error(raw, train, e)) from None


# -----------------------------------------------------------------------------
# Interrupted: the one failure that is not an Error: the command line exits 128 + signal.


class Interrupted(Exception):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


# -----------------------------------------------------------------------------
# Out-of-distribution data files: Fashion-MNIST and image folders (notMNIST-459).
# Debian ships Fashion-MNIST gzipped, outside torchvision's layout, and torchvision 0.29's
# IDX reader (torchvision.datasets.mnist.read_image_file) neither reads .gz files nor says
# what is wrong with a damaged one (a bare AssertionError): read_idx does both.

FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


def read_idx(path):
    """Read one IDX file (optionally .gz) into a uint8 tensor, checking its header."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise Error(f"cannot read {path}: {e}") from None
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] not in (1, 3):
        raise Error(f"{path} is not an MNIST IDX file of unsigned bytes (wrong magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise Error(f"{path} is truncated (header cut short)")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + math.prod(shape)
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "longer than its header says"
        raise Error(f"{path} is {kind}: {len(raw)} bytes, header promises {expected}")
    if len(raw) == 4 + 4 * ndim:  # a file of 0 images: torch.frombuffer refuses an empty buffer
        return torch.zeros(shape, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=4 + 4 * ndim).view(*shape)


def _find(folder, name):
    for candidate in (Path(folder) / name, Path(folder) / (name + ".gz")):
        if candidate.exists():
            return candidate
    return None


def load_fashion(data_dir, fashion_dir=None):
    """Fashion-MNIST test images (10000, 784).

    From fashion_dir if given; else DATA_DIR/FashionMNIST/raw, then Debian's folder, then
    downloaded by torchvision into DATA_DIR (once).
    """
    folders = [fashion_dir] if fashion_dir else [Path(data_dir) / "FashionMNIST" / "raw", FASHION_SYSTEM_DIR]
    for folder in folders:
        img, lbl = (_find(folder, n) for n in MNIST_FILES[False])
        if img and lbl:
            images, labels = read_idx(img), read_idx(lbl)
            check_labelled(images, labels, img, lbl)
            return images.reshape(len(images), 784).float().div_(255)
    where = " or ".join(map(str, folders))
    if fashion_dir:
        raise Error(f"Fashion-MNIST test files not found in {where} (--fashion-dir)")
    try:
        return load_mnist(data_dir, train=False, dataset="FashionMNIST")[0]
    except Error as e:
        raise Error(f"Fashion-MNIST test files not found in {where} and the download failed "
                    f"({e}); apt-get install dataset-fashion-mnist, or --fashion-dir") from None


NOTMNIST_URL = "https://github.com/paraschopra/bayesian-neural-network-mnist/archive/refs/heads/master.zip"


def load_notmnist(data_dir, notmnist_dir=None):
    """The article's notMNIST-459 letters (459, 784): notmnist_dir, or DATA_DIR/notMNIST-459 (fetched once)."""
    folder = Path(notmnist_dir) if notmnist_dir else Path(data_dir) / "notMNIST-459"
    if notmnist_dir is None and not folder.exists():
        fetch_notmnist(folder)
    return load_image_folder(folder)


def fetch_notmnist(folder, url=None):
    """Download the article's repository (MIT licence) and keep its not-mnist/<letter>/*.png in folder.

    By hand rather than torchvision.datasets.utils.download_and_extract_archive, which would
    unpack the whole repository, whatever paths its archive names, to keep 459 small files.
    """
    import urllib.request
    import zipfile

    url = url or NOTMNIST_URL
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            archive = zipfile.ZipFile(io.BytesIO(response.read()))
    except (OSError, zipfile.BadZipFile) as e:
        raise Error(f"no notMNIST-459 in {folder} and the download from {url} failed ({e}); "
                    f"--notmnist-dir points at a copy") from None
    part = folder.with_name(folder.name + ".part")  # renamed into place when complete
    count = 0
    for member in archive.namelist():
        parts = member.split("/")  # <repo>-<branch>/not-mnist/<letter>/<file>.png
        if len(parts) == 4 and parts[1] == "not-mnist" and parts[2].isalpha() and parts[3].endswith(".png"):
            (part / parts[2]).mkdir(parents=True, exist_ok=True)
            (part / parts[2] / Path(parts[3]).name).write_bytes(archive.read(member))
            count += 1
    if not count:
        raise Error(f"the archive at {url} holds no not-mnist/<letter>/*.png images")
    os.replace(part, folder)


def load_image_folder(folder):
    """Every PNG/JPEG under `folder` (e.g. notMNIST-459/A/*.png) as (N, 784) in [0, 1]."""
    from PIL import Image

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise Error(f"no PNG or JPEG images under {folder}")
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("L")
                if im.size != (28, 28):
                    im = im.resize((28, 28), Image.BILINEAR)
                images.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8))
        except OSError as e:
            raise Error(f"cannot read image {p}: {e}") from None
    return torch.stack(images).float().div_(255)


# -----------------------------------------------------------------------------
# The training hook: state, resuming, checkpoints, signals, divergence, progress.


class TrainingRun:
    """What `train` needs beyond the article's loop; its methods are called by train/train_epoch.

    With checkpoint_path, a checkpoint is written atomically after every epoch and when
    stop_requested() turns true (a signal); resume_state (a loaded checkpoint) restores
    the posterior, optimiser, RNG and position within the epoch, so training continues
    exactly where it stopped.
    """

    def __init__(self, net, optim, steps, epochs, progress, log, checkpoint_path=None, settings=None,
                 resume_state=None, stop_requested=None):
        self.net, self.optim, self.steps, self.epochs, self.log = net, optim, steps, epochs, log
        self.progress, self.checkpoint_path, self.settings = progress, checkpoint_path, settings or {}
        self.resume_state, self.stop_requested, self.bar = resume_state, stop_requested, None
        self.state = {"epoch": 0, "step": 0, "perm": None, "loss_sum": 0.0, "losses": [], "train_seconds": 0.0}

    def start(self):
        r = self.resume_state
        if r is not None:
            load_net_state(self.net, r["net"], "the checkpoint")
            self.optim.set_state(r["optim"])
            torch.set_rng_state(r["rng"])
            if r.get("cuda_rng") is not None:  # same device type: checked by the settings on resume
                torch.cuda.set_rng_state(r["cuda_rng"], self.net.device)
            self.state.update({k: r[k] for k in self.state})
            self.state["perm"] = None if r["perm"] is None else r["perm"].to(self.net.device)
        self.started = time.perf_counter() - self.state["train_seconds"]
        self._new_bar()
        return self.state

    def _new_bar(self):
        from tqdm.auto import tqdm

        s = self.state
        self.bar = tqdm(total=self.steps, initial=s["step"], desc=f"epoch {s['epoch'] + 1}/{self.epochs}",
                        disable=None if self.progress else True, leave=False)  # None: off when not a terminal

    @contextlib.contextmanager
    def reporting_nan(self):
        """after_step reports a NaN loss with its epoch and step; Pyro's own warning would repeat it."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
            yield

    def after_step(self, state, loss):
        s = state
        if not math.isfinite(loss):
            raise Error(f"loss became {loss} at epoch {s['epoch'] + 1} step {s['step']}; "
                                   f"lower --lr (last good checkpoint kept)")
        self.bar.update(1)
        if self.progress and s["step"] % 20 == 0:
            self.bar.set_postfix(loss=f"{s['loss_sum'] / s['step']:.4f}")
        if self.stop_requested is not None and self.stop_requested():
            self.save("interrupted")
            raise Interrupted(f"interrupted at epoch {s['epoch'] + 1} step {s['step']}", self.stop_requested())

    def end_epoch(self, loss):
        s = self.state
        self.bar.close()
        s["losses"].append(loss)
        s.update(epoch=s["epoch"] + 1, step=0, perm=None, loss_sum=0.0)  # the next epoch reshuffles
        self.log(f"epoch {s['epoch']}/{self.epochs}  loss {loss:.4f} per example  ({self._seconds():.1f} s)")
        self.save(f"end of epoch {s['epoch']}")
        if s["epoch"] < self.epochs:
            self._new_bar()

    def finish(self):
        if self.bar is not None:
            self.bar.close()
        check_finite(self.net, "at the end of training")
        self.net.trained.fill_(True)
        return {"losses": self.state["losses"], "train_seconds": self._seconds()}

    def _seconds(self):
        self.state["train_seconds"] = time.perf_counter() - self.started
        return self.state["train_seconds"]

    def save(self, why):
        self._seconds()
        if self.checkpoint_path is not None:
            check_finite(self.net, f"{why}; last good checkpoint kept")
            save_checkpoint(self.checkpoint_path, self.settings, self.net, self.optim, self.state)


def check_finite(net, when):
    if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
        raise Error(f"a parameter became non-finite ({when})")


class SignalFlag:
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


class Plumbing:
    """The one hook from the article's steps (Parts I and II) into this part: each call site says
    `Plumbing.<name>`, so a reader of the article sees where it leaves the article."""

    data_files = staticmethod(data_files)  # load_mnist: errors that name the file
    check_labelled = staticmethod(check_labelled)  # load_mnist: what torchvision does not check
    to_images = staticmethod(to_images)  # every function that takes images: the input checks
    TrainingRun = TrainingRun  # train: progress bar, NaN checks, checkpoints, resuming, signals


def keep_freed_memory():
    """Ask glibc's malloc to reuse freed memory instead of handing it back to the kernel.

    Every training step allocates and frees a few dozen tensors of up to 3 MiB (the
    sampled 1024x784 weights, their noise, their gradients). By default glibc returns such
    blocks to the kernel and gets fresh zeroed pages next step: millions of page faults
    per epoch, about a third of the time of a CPU epoch here (docs/speed.md). Raising
    the mmap and trim thresholds keeps the blocks for reuse. Nothing computed changes.
    Called by the command line only (it changes the whole process); a no-op without glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
        libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest allowed value
        libc.mallopt(m_trim_threshold, 1024 * 2**20)
    except (OSError, AttributeError):
        pass


def peak_rss_mib():
    """Peak resident memory of this process in MiB; None where `resource` does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


# -----------------------------------------------------------------------------
# Saving and loading. Files hold tensors and plain settings only and are read with
# torch.load(weights_only=True): opening a shared file runs no code. Every write is
# atomic (atomic_write, Part I).

CHECKPOINT_FORMAT = "bnn_mnist-checkpoint-2"
GUIDE_FORMAT = "bnn_mnist-guide-2"


def atomic_save(obj, path):
    """torch.save(obj) to path, whole or not at all (atomic_write, Part I)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def net_settings(net, prior_scale):
    """What is needed to rebuild the BNN: stored next to its parameters."""
    input_size, hidden_size, output_size = net.sizes
    return {"input_size": input_size, "hidden_size": hidden_size, "output_size": output_size,
            "prior_scale": prior_scale}


def save_checkpoint(path, settings, net, optim, state):
    # a CPU run never touches CUDA
    cuda_rng = torch.cuda.get_rng_state(net.device) if net.device.type == "cuda" else None
    atomic_save({"format": CHECKPOINT_FORMAT, "settings": settings, "net": net.state_dict(),
                 "optim": optim.get_state(), "rng": torch.get_rng_state(), "cuda_rng": cuda_rng, **state}, path)


def save_guide(path, net, prior_scale=None, rule=None):
    """The trained posterior, the settings to rebuild the BNN and its refusal rule.

    prior_scale and rule default to the net's own (net.prior_scale, net.rule).
    """
    prior_scale = net.prior_scale if prior_scale is None else prior_scale
    rule = net.rule if rule is None else rule
    settings = net_settings(net, prior_scale) | {"rule": rule}
    atomic_save({"format": GUIDE_FORMAT, "settings": settings, "net": net.state_dict()}, path)


def _load(path, expected_format, device):
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise Error(f"no such file: {path}") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Error(f"{path} is not a readable bnn_mnist file ({type(e).__name__}: {first})") from None
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise Error(f"{path} has format {found!r}, expected {expected_format!r}")
    return obj


def load_checkpoint(path, device="cpu"):
    obj = _load(path, CHECKPOINT_FORMAT, device)
    obj["rng"] = obj["rng"].cpu()  # RNG states are CPU byte tensors, whatever map_location did
    if obj.get("cuda_rng") is not None:
        obj["cuda_rng"] = obj["cuda_rng"].cpu()
    return obj


def load_guide(path, device="cpu"):
    """A BNN rebuilt from a saved guide, holding its posterior (and its refusal rule, net.rule)."""
    obj = _load(path, GUIDE_FORMAT, device)
    s = obj["settings"]
    if s.get("prior", "normal") != "normal":  # an experiment that lost its selection, no longer here
        raise Error(f"{path} was trained with the {s['prior']!r} prior, which this version does not have")
    net = BNN(s["input_size"], s["hidden_size"], s["output_size"], prior_scale=s["prior_scale"]).to(device)
    load_net_state(net, obj["net"], path)
    net.rule = s.get("rule")
    return net


def load_net_state(net, state_dict, source):
    """net.load_state_dict with a clear error when the saved posterior does not fit this net."""
    check_net_state(net, state_dict, source)
    net.load_state_dict(state_dict)


def check_net_state(net, state_dict, source):
    own = net.state_dict()
    for name, p in own.items():
        saved = state_dict.get(name)
        if saved is None:
            raise Error(f"{source} has no parameter {name}")
        if saved.shape != p.shape:
            raise Error(f"{source} holds {name} of shape {tuple(saved.shape)}, but this BNN needs "
                          f"{tuple(p.shape)} (a different --hidden-size?)")
    extra = set(state_dict) - set(own)
    if extra:
        raise Error(f"{source} holds parameters this BNN does not have: {', '.join(sorted(extra))}")


def write_json(obj, path):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))


# -----------------------------------------------------------------------------
# The command line's settings: argparse reads every default from Config.


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
    d, pos_int, pos_float = DEFAULTS, _positive(int), _positive(float)
    p = argparse.ArgumentParser(
        prog="bnn_mnist.py", formatter_class=_HelpFormatter,
        description="Train a Bayesian neural network on MNIST with Pyro; predict, say 'I don't know'.",
        epilog="Then: `python bnn_mnist.py predict FILE ...` answers your own images, and `python bnn_mnist.py "
               "serve` opens a page to draw on (each has its own --help).")
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data-dir", default=d.data_dir, help="folder holding MNIST/raw (downloaded there if missing)")
    g.add_argument("--out-dir", default=d.out_dir, help="every output goes here: metrics.json, guide.pt, PNGs")
    recipe = ", ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in ARTICLE.items())
    p.add_argument("--article", action="store_true",
                   help=f"the article's recipe as written: {recipe} (flags given beside it win; --kl-weight W then "
                        "counts the KL once per data set, weighted by W)")
    _training_flags(p.add_argument_group("model and training"), d, pos_int, pos_float)
    _uncertainty_flags(p.add_argument_group("prediction and uncertainty"), d, pos_int)
    g = p.add_argument_group("smoke runs")
    g.add_argument("--max-batches", type=pos_int, default=d.max_batches, help="cap on minibatches per epoch (default: all)")
    g.add_argument("--train-subset", type=pos_int, default=d.train_subset, help="train on the first N images (default: all)")
    g.add_argument("--no-plots", action="store_true", help="write no figures")
    return p


def _training_flags(g, d, pos_int, pos_float):
    g.add_argument("--epochs", type=pos_int, default=d.epochs, help="passes over the training set")
    g.add_argument("--batch-size", type=pos_int, default=d.batch_size, help="minibatch size")
    g.add_argument("--lr", type=pos_float, default=d.lr, help="Adam's initial learning rate")
    g.add_argument("--lr-decay", type=pos_float, default=d.lr_decay,
                   help="factor applied to the learning rate over each epoch, smoothly per step (1: constant)")
    g.add_argument("--scale-lr-factor", type=pos_float, default=d.scale_lr_factor,
                   help="the guide's scales (rho) use this multiple of the learning rate")
    g.add_argument("--hidden-size", type=pos_int, default=d.hidden_size, help="hidden units")
    g.add_argument("--prior-scale", type=pos_float, default=d.prior_scale, help="std of the Normal(0, s) prior")
    g.add_argument("--kl-weight", type=pos_float, default=d.kl_weight,
                   help="weight of the KL term in the ELBO (1: the article's; below 1: a tempered posterior)")
    g.add_argument("--kl-per-batch", action=argparse.BooleanOptionalAction, default=d.kl_per_batch,
                   help="the article's loss: each minibatch's NLL, not scaled to the data set, plus the whole KL")
    g.add_argument("--init", choices=INITS, default=d.init,
                   help="the guide's start: torch (nn.Linear's init, scales --init-scale) or article (N(0, 1) draws)")
    g.add_argument("--init-scale", type=pos_float, default=d.init_scale, help="initial std of the guide")
    g.add_argument("--elbo", choices=ELBOS, default=d.elbo,
                   help="trace: Pyro's Trace_ELBO on model and guide (the article's); meanfield: TraceMeanField_ELBO "
                        "(analytic KL); local: a hand-written loss with the analytic KL and each image's own "
                        "pre-activation draw (local reparameterization: faster, see docs/how-it-works.md)")
    g.add_argument("--val-size", type=int, default=d.val_size,
                   help="training images held out (not trained on) to set the refusal thresholds")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="auto: cuda if available")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")


def _uncertainty_flags(g, d, pos_int):
    g.add_argument("--num-samples", type=pos_int, default=d.num_samples,
                   help="posterior samples for the forced prediction (test accuracy)")
    g.add_argument("--average", choices=("probs", "logits"), default=d.average,
                   help="the forced prediction averages the samples' probabilities (the posterior predictive) "
                        "or their logits (the article)")
    g.add_argument("--unc-samples", type=pos_int, default=d.unc_samples,
                   help="posterior samples for uncertainty, abstention and OOD")
    g.add_argument("--sampler", choices=SAMPLERS, default=d.sampler,
                   help="how those are drawn: local (each image's own exact draws, fast) or weights (whole weight "
                        "sets, as the forced prediction)")
    g.add_argument("--rule", choices=("quantiles", "median"), default=d.rule,
                   help="quantiles: refuse above quantiles of --measure and expected entropy on the held-out digits; "
                        f"median: the article's, refuse unless some class's median probability exceeds {ARTICLE_MEDIAN}")
    g.add_argument("--measure", choices=MEASURES, default=d.measure, help="uncertainty measure for refusing")
    g.add_argument("--threshold", type=float, default=d.threshold,
                   help="refuse when the measure exceeds this (default: its --refuse-quantile on the held-out images)")
    g.add_argument("--refuse-quantile", type=float, default=d.refuse_quantile,
                   help="the threshold is this quantile of the measure on the held-out training images")
    g.add_argument("--ambiguity-quantile", type=float, default=d.ambiguity_quantile,
                   help="also refuse when expected entropy exceeds this quantile of it on the held-out images "
                        "(the samples agree the digit is ambiguous); 0: off")
    g.add_argument("--ood", default=d.ood,
                   help="comma-separated out-of-distribution sets from fashion, notmnist, noise; or 'none'")
    g.add_argument("--fashion-dir", default=d.fashion_dir,
                   help="folder with Fashion-MNIST t10k-*-ubyte[.gz] (default: DATA_DIR/FashionMNIST/raw, "
                        f"then {FASHION_SYSTEM_DIR}, else downloaded into DATA_DIR)")
    g.add_argument("--notmnist-dir", default=d.notmnist_dir,
                   help="folder of letter images (default: DATA_DIR/notMNIST-459, fetched there once)")
    g.add_argument("--noise-count", type=pos_int, default=d.noise_count, help="uniform-noise images")
    g.add_argument("--shift-size", type=pos_int, default=d.shift_size,
                   help="test digits in each rotated (0-180 degrees), mirrored and overlaid set")
    g.add_argument("--selective-measure", choices=MEASURES, default=d.selective_measure,
                   help="measure that ranks the test digits for selective prediction (accuracy on the 95%% "
                        "most certain, AURC)")


TRAIN_ARGS = ("epochs", "batch_size", "lr", "lr_decay", "scale_lr_factor", "prior_scale", "kl_weight", "elbo",
              "kl_per_batch", "max_batches")


def training_kwargs(cfg):
    """The Config's settings that `train` takes, as keyword arguments."""
    return {k: getattr(cfg, k) for k in TRAIN_ARGS}


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.article:
        apply_article(args, given_flags(parser, argv))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda was asked for but no CUDA device is available")
    if args.threshold is not None:
        lo, hi = MEASURE_RANGE[args.measure]
        if not lo <= args.threshold <= hi:
            parser.error(f"argument --threshold: {args.measure} lies in [{lo:g}, {hi:.4g}], got {args.threshold:g}")
    if not 0 < args.refuse_quantile < 1:
        parser.error(f"argument --refuse-quantile: must lie strictly between 0 and 1, got {args.refuse_quantile:g}")
    if not 0 <= args.ambiguity_quantile < 1:
        parser.error(f"argument --ambiguity-quantile: must lie in [0, 1), got {args.ambiguity_quantile:g}")
    if args.val_size < 0:
        parser.error(f"argument --val-size: must be >= 0, got {args.val_size}")
    if args.rule == "median" and args.threshold is not None:
        parser.error(f"argument --threshold: the median rule has its own cut ({ARTICLE_MEDIAN}); "
                     "--threshold sets the quantile rule's")
    if args.val_size == 0 and args.rule == "quantiles" and (args.threshold is None or args.ambiguity_quantile):
        parser.error("argument --val-size: 0 holds nothing out to set the thresholds; "
                     "give --threshold and --ambiguity-quantile 0")
    sets = [s.strip() for s in args.ood.split(",") if s.strip()]
    sets = [] if sets == ["none"] else sets
    bad = [s for s in sets if s not in ("fashion", "notmnist", "noise")]
    if bad:
        parser.error(f"argument --ood: unknown set(s) {', '.join(bad)} (choose from fashion, notmnist, noise, none)")
    args.ood = ",".join(sets)
    del args.article
    return Config(**vars(args))


def given_flags(parser, argv):
    """The settings named on the command line (not left at their defaults)."""
    unset = object()  # argparse fills in a default only where the namespace has no value yet
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(parser.parse_args(argv)), unset)))
    return {k for k, v in vars(given).items() if v is not unset}


def apply_article(args, given):
    """--article: ARTICLE's settings, except those given beside it. An explicit --kl-weight
    counts the KL once per data set (the article's loss was N/B = 469 times heavier)."""
    for name, value in ARTICLE.items():
        if name not in given:
            setattr(args, name, value)
    if "kl_weight" in given and "kl_per_batch" not in given:
        args.kl_per_batch = False


# =============================================================================
# Part VI. Your own images: prepared as MNIST's digits were, answered with the posterior's
# spread (`python bnn_mnist.py predict FILE ...`), and a page to draw on (`... serve`).
# =============================================================================


class ImageError(Error):
    """A picture that cannot be answered (not an image, empty, without ink): predict_files and
    the page report it for that picture and go on with the others."""


def prepare_image(image):
    """A picture of one digit made into an MNIST input: (784,) float in [0, 1].

    image: a file path, bytes of an image file, a PIL image, or a 2-D array of gray levels
    in [0, 1]. MNIST's recipe: grayscale, light ink on a dark ground (a light background is
    inverted), cropped to the ink, fitted into 20x20 keeping the aspect ratio, and placed in
    28x28 with its centre of mass at the centre. Raises ImageError for an unreadable file or
    a picture without ink.
    """
    import numpy as np

    gray = _gray_levels(image)  # (H, W) in [0, 1]
    border = _border(gray)
    background = float(np.median(border))
    if background - gray.min() > gray.max() - background:  # the ink is darker than the ground, as on paper
        gray, border, background = 1 - gray, 1 - border, 1 - background  # MNIST's light ink on black
    span = float(gray.max()) - background
    if span < 0.15:
        raise ImageError("no ink: the picture is one flat shade")
    ink = np.clip((gray - background) / span, 0, 1)
    # the paper's grain is not ink: cut at 6 noise sds of the border (robustly: no stray speck widens the
    # crop), at least 0.02
    noise = 1.4826 * float(np.median(np.abs(border - background))) / span
    ink[ink < min(0.5, max(0.02, 6 * noise))] = 0
    rows, cols = np.nonzero(ink)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    return torch.from_numpy(_centre_by_mass(_fit(crop, 20))).float().reshape(784)


def _border(gray):
    """The outermost pixels of a picture (H, W), flat."""
    import numpy as np

    return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])


def _gray_levels(image):
    """(H, W) float array in [0, 1] from a path, bytes, a PIL image or an array."""
    import numpy as np
    from PIL import Image, ImageOps

    if isinstance(image, (str, Path)) and not Path(image).is_file():
        raise ImageError("no such file")
    if isinstance(image, (str, Path, bytes)):
        try:
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
                if im.width * im.height > 40_000_000:
                    raise ImageError(f"the picture is too large ({im.width} x {im.height} pixels)")
                return _gray_levels(ImageOps.exif_transpose(im))  # a phone photo the way it was held
        except ImageError:
            raise
        except Exception as e:  # PIL raises many kinds for broken files: each is "not an image" here
            raise ImageError(f"not an image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "P", "PA"):  # transparency: on a white background, as on paper
            image = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit and float scans
            levels = np.asarray(image, dtype=np.float32)
            return np.clip(levels / (65535 if levels.max() > 255 else 255 if levels.max() > 1 else 1), 0, 1)
        return np.asarray(image.convert("L"), dtype=np.float32) / 255
    gray = np.asarray(image, dtype=np.float32)
    if gray.ndim != 2 or min(gray.shape) < 1 or max(gray.shape) > 4096:
        raise ImageError(f"pixels must be a 2-D grid of at most 4096 x 4096 gray levels, got shape {gray.shape}")
    if not np.isfinite(gray).all() or gray.min() < 0 or gray.max() > 1:
        raise ImageError("pixels must be finite gray levels in [0, 1]")
    return gray


def _fit(ink, size):
    """ink (h, w) resized so that its longer side is `size`, keeping the aspect ratio."""
    import numpy as np
    from PIL import Image

    h, w = ink.shape
    scale = size / max(h, w)
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = Image.fromarray(ink.astype(np.float32), mode="F").resize(shape, Image.LANCZOS, reducing_gap=None)
    return np.clip(np.asarray(resized), 0, 1)


def _centre_by_mass(patch, side=28):
    """patch (h, w) placed in a side x side field with its centre of mass at the centre."""
    import numpy as np

    h, w = patch.shape
    mass = patch.sum()
    cy = (patch.sum(1) * np.arange(h)).sum() / mass
    cx = (patch.sum(0) * np.arange(w)).sum() / mass
    # MNIST's digits have their centre of mass at pixel (14, 14) (rows and columns from 0)
    top = int(np.clip(round(side / 2 - cy), 0, side - h))
    left = int(np.clip(round(side / 2 - cx), 0, side - w))
    field = np.zeros((side, side), dtype=np.float32)
    field[top : top + h, left : left + w] = patch
    return field


def answer(x, net, num_samples=DEFAULTS.unc_samples, generator=None):
    """What the network says about one prepared image x (784,): a dict a page or a person reads.

    "samples": (S, 10) class probabilities of the posterior samples, "mean": (10,), "answer":
    the class or None for "I don't know", and the rule's scores against its thresholds.
    """
    rule = net.rule
    if not rule:
        raise ValueError("this net has no refusal rule: load a guide saved by a run (out/guide.pt)")
    probs = sample_probs_local(x.reshape(1, 784), net, num_samples, generator)  # (S, 1, 10)
    u = scores_for(probs, rule)
    pred, refused = int(rule_classes(probs, rule)[0]), bool(refuses(u, rule)[0])
    return {"answer": None if refused else pred, "verdict": "I don't know" if refused else str(pred),
            "mean": probs.mean(0)[0].tolist(), "samples": probs[:, 0].tolist(),
            "scores": {m: float(v[0]) for m, v in u.items()}, "rule": rule}


def describe(result):
    """One line for a person: the verdict, and each score of the rule against its threshold."""
    checks = []
    for m, t in result["rule"].items():
        v = result["scores"][m]
        if m == "max_median_prob":
            checks.append(f"highest class median {v:.3f} {'>' if v > t else '<='} {t:g}")
        else:
            checks.append(f"{m.replace('_', ' ')} {v:.4f} {'>' if v > t else '<='} threshold {t:.4f}")
    best = max(range(CLASSES), key=lambda c: result["mean"][c])
    return f"{result['verdict']} (mean probability {result['mean'][best]:.2f} for {best}; {'; '.join(checks)})"


def predict_files(paths, net, num_samples=DEFAULTS.unc_samples, out_dir=None, log=print):
    """Answer each image file with net; returns {path: answer dict, or the error's message}.

    With out_dir, each answer's figure (the prepared digit beside its samples' class
    probabilities) is written to OUT_DIR/<file name>.png. A file that cannot be answered is
    reported and the others still are.
    """
    results, names = {}, {}
    for path in paths:
        name = Path(path).name  # a/1.png and b/1.png: figures 1.png.png and 1.png-2.png
        names[name] = names.get(name, 0) + 1
        try:
            x = prepare_image(path)
        except ImageError as e:
            results[path] = str(e)
            log(f"error: {path}: {e}", file=sys.stderr)
            continue
        result = results[path] = answer(x, net, num_samples) | {"prepared": x}
        log(f"{path}: {describe(result)}")
        if out_dir is not None:
            figure = f"{name}.png" if names[name] == 1 else f"{name}-{names[name]}.png"
            plot(x, torch.tensor(result["samples"]), path=Path(out_dir) / figure)
    return results


# -----------------------------------------------------------------------------
# The page: the standard library's HTTP server, one static page (bnn_mnist.html beside this
# file), and JSON over fetch. It answers POST /predict with `answer`'s dict for an image
# ({"image": a data URL or base64 of a PNG/JPEG}) or a grid of gray levels ({"pixels": rows});
# nothing it serves is named by a request, so no request can read a file.

PAGE = Path(__file__).with_name("bnn_mnist.html")
MAX_BODY = 8 * 2**20  # bytes: a large photo as a data URL


class PageServer:
    """The state a served page needs: one trained net, answered one request at a time."""

    def __init__(self, net, num_samples=DEFAULTS.unc_samples):
        import threading

        self.net, self.num_samples, self.lock = net, num_samples, threading.Lock()

    def predict(self, body):
        """(status, dict) for a request body (bytes)."""
        import base64
        import binascii

        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            return 400, {"error": f"the body is not JSON: {str(e)[:200]}"}
        if not isinstance(request, dict) or ("image" in request) == ("pixels" in request):
            return 400, {"error": 'send {"image": "<data URL or base64>"} or {"pixels": [[gray levels]]}'}
        try:
            if "image" in request:
                if not isinstance(request["image"], str):
                    return 400, {"error": "image must be a string: a data URL or base64"}
                data = request["image"].split(",", 1)[-1]
                try:
                    image = base64.b64decode(data, validate=True)
                except (binascii.Error, ValueError):
                    return 400, {"error": "image is not base64"}
            else:
                image = request["pixels"]
                if not (isinstance(image, list) and image and all(isinstance(r, list) for r in image)
                        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for r in image for v in r)
                        and len({len(r) for r in image}) == 1):
                    return 400, {"error": "pixels must be a non-empty list of rows of numbers, all rows one length"}
            x = prepare_image(image)
        except ImageError as e:
            return 422, {"error": str(e)}
        t0 = time.perf_counter()
        with self.lock, torch.no_grad():
            result = answer(x, self.net, self.num_samples)
        result["ms"] = 1000 * (time.perf_counter() - t0)
        result["prepared"] = x.tolist()
        return 200, result


def make_handler(server_state):
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] not in ("/", "/index.html"):
                return self._send(404, b'{"error": "not found"}', "application/json")
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")

        def do_POST(self):
            if self.path != "/predict":
                return self._json(404, {"error": "not found"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._json(411, {"error": "a Content-Length is required"})
            if length < 0 or length > MAX_BODY:
                return self._json(413, {"error": f"the body is larger than {MAX_BODY} bytes"})
            self._json(*server_state.predict(self.rfile.read(length)))

        def _json(self, status, obj):
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _send(self, status, body, kind):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # one line per request is noise in a terminal
            pass

    return Handler


def make_server(net, host="127.0.0.1", port=8000, num_samples=DEFAULTS.unc_samples):
    """The page's HTTP server for net (not yet serving: call .serve_forever(); port 0 picks a free one)."""
    from http.server import ThreadingHTTPServer

    class Server(ThreadingHTTPServer):
        daemon_threads = True  # Ctrl-C does not wait for open connections
        request_queue_size = 64  # a burst of strokes from several pages queues rather than being refused

        def handle_error(self, request, client_address):
            # a page closed or reloaded before its answer came: nothing is wrong, so no traceback
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    return Server((host, port), make_handler(PageServer(net, num_samples)))


# =============================================================================
# Part VII. The whole run, from the command line or `main([...])` in a notebook.
# =============================================================================

OUTPUTS = ("metrics.json", "guide.pt", "checkpoint.pt", "prediction.png", "reliability.png",
           "coverage.png", "uncertainty_hist.png", "examples.png", "shift.png", "posterior_scale.png")
# what a checkpoint must agree on to be resumed: train's arguments and what shapes the data and net
TRAINING_SETTINGS = (*TRAIN_ARGS, "init", "init_scale", "seed", "train_subset", "val_size")


def prepare_out_dir(out_dir):
    """Create out_dir, check it is writable, and remove temporary files a killed run left."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
        for name in OUTPUTS:
            for leftover in out.glob(f"{name}.*.tmp"):  # atomic_write's temporary files
                leftover.unlink()
    except OSError as e:
        raise Error(f"cannot write to --out-dir {out}: {e.strerror or e}") from None
    return out


def split_data(cfg, device):
    """Training, held-out validation and test tensors on the device.

    The validation images are a fixed random draw from the training set (the same for
    every seed), never trained on: they set the refusal threshold.
    """
    x, y = load_mnist(cfg.data_dir, train=True)
    x_test, y_test = load_mnist(cfg.data_dir, train=False)
    x_tr, y_tr, x_val, y_val = holdout_split(x, y, cfg.val_size)
    if cfg.train_subset:
        x_tr, y_tr = x_tr[: cfg.train_subset], y_tr[: cfg.train_subset]
    return [t.to(device) for t in (x_tr, y_tr, x_val, y_val, x_test, y_test)]


def resume_state_for(cfg, net, settings, ckpt_path, device):
    """The checkpoint to continue from (--resume), checked against this run's settings."""
    if not cfg.resume:
        if ckpt_path.exists():
            print(f"note: starting afresh; {ckpt_path} from an earlier run will be replaced "
                  f"(--resume continues it instead)")
        return None
    if not ckpt_path.exists():
        raise Error(f"--resume: no checkpoint at {ckpt_path}")
    state = load_checkpoint(ckpt_path, device)
    check_net_state(net, state["net"], ckpt_path)
    changed = {k: (state["settings"].get(k), v) for k, v in settings.items()
               if k != "epochs" and state["settings"].get(k) != v}
    if changed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        raise Error(f"--resume: {ckpt_path} was made with other settings ({what})")
    if state["epoch"] > cfg.epochs:
        raise Error(f"--resume: {ckpt_path} has already trained {state['epoch']} epochs; "
                         f"--epochs {cfg.epochs} cannot undo that")
    print(f"resuming from {ckpt_path}: epoch {state['epoch']}, step {state['step']}")
    return state


def run(cfg):
    """The whole pipeline for one Config; returns the metrics dict (also in metrics.json)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    out = prepare_out_dir(cfg.out_dir)
    pyro.set_rng_seed(cfg.seed)
    x_train, y_train, x_val, _, x_test, y_test = split_data(cfg, device)
    print(f"data: {len(x_train)} training, {len(x_val)} held-out, {len(x_test)} test images from "
          f"{cfg.data_dir}; device {device}")

    net = BNN(784, cfg.hidden_size, CLASSES, cfg.init_scale, cfg.prior_scale, cfg.init).to(device)
    settings = net_settings(net, cfg.prior_scale) | {k: getattr(cfg, k) for k in TRAINING_SETTINGS}
    settings["device"] = device.type  # the RNG streams differ: resume on the same kind of device
    ckpt_path = out / "checkpoint.pt"
    resume_state = resume_state_for(cfg, net, settings, ckpt_path, device)
    if device.type == "cpu":
        keep_freed_memory()
    else:
        torch.cuda.reset_peak_memory_stats(device)
    with SignalFlag() as flag:
        result = train(net, x_train, y_train, **training_kwargs(cfg), checkpoint_path=ckpt_path,
                       settings=settings, resume_state=resume_state, stop_requested=flag)
        if flag():  # the signal came during the last checkpoint write: stop now all the same
            raise Interrupted(f"interrupted after epoch {cfg.epochs}", flag())
    rule = {}
    if cfg.rule == "median":
        rule = article_rule()
    elif len(x_val):
        rule = refusal_rule(x_val, net, cfg.measure, cfg.refuse_quantile, cfg.ambiguity_quantile, cfg.unc_samples,
                            cfg.sampler)
    if cfg.threshold is not None and cfg.rule == "quantiles":
        rule[cfg.measure] = cfg.threshold
    save_guide(out / "guide.pt", net, cfg.prior_scale, rule)

    metrics = forced_prediction(cfg, net, x_test, y_test, result, device, out)
    write_json(metrics, out / "metrics.json")  # kept even if the uncertainty part fails
    metrics |= uncertainty_report(cfg, net, x_test, y_test, rule, device, out, pixel_rarity(x_train))
    metrics["peak_rss_mib"] = peak_rss_mib()
    if device.type == "cuda":
        metrics["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    write_json(metrics, out / "metrics.json")
    print(f"wrote {out / 'metrics.json'}")
    return metrics


def forced_prediction(cfg, net, x_test, y_test, result, device, out):
    """The article's prediction: num_samples samples, every test image gets a class."""
    _sync(device)
    t0 = time.perf_counter()
    probs = predict_prob(x_test, net, cfg.num_samples, cfg.average)
    _sync(device)
    seconds = time.perf_counter() - t0
    forced = evaluate(probs, y_test)
    print(f"test accuracy {forced['accuracy']:.4f}  NLL {forced['nll']:.4f}  ECE {forced['ece']:.4f}  "
          f"({cfg.num_samples} samples' {cfg.average} averaged, {seconds:.2f} s)")
    if not cfg.no_plots:  # the article's figure, for the first test digit, on its own random
        # numbers: with or without --no-plots, the samples after it and so the metrics are the same
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            logits = sample_logits(x_test[:1], net, cfg.num_samples)[:, 0]  # (S, 10)
            # the article's bars: the softmax of its min-max-normalised mean logits
            bars = logits.softmax(-1) if cfg.average == "probs" else normalize(logits.mean(0)).softmax(-1)
            plot(x_test[0].cpu(), bars, label=y_test[0], path=out / "prediction.png")
    return {"test_accuracy": forced["accuracy"], "test_nll": forced["nll"], "test_ece": forced["ece"],
            "average": cfg.average, "epochs": len(result["losses"]),
            "epoch_losses": result["losses"], "train_seconds": result["train_seconds"],
            "predict_seconds": seconds, "num_samples": cfg.num_samples, "device": str(device), "seed": cfg.seed}


def load_ood_sets(cfg, report):
    """The out-of-distribution sets asked for, {name: (N, 784)}; a missing one is a warning."""
    ood = {}
    for name in filter(None, cfg.ood.split(",")):
        try:
            if name == "fashion":
                ood["Fashion-MNIST"] = load_fashion(cfg.data_dir, cfg.fashion_dir)
            elif name == "notmnist":
                ood["notMNIST"] = load_notmnist(cfg.data_dir, cfg.notmnist_dir)
            elif name == "noise":
                g = torch.Generator().manual_seed(cfg.seed + 1)
                ood["noise"] = torch.rand(cfg.noise_count, 784, generator=g)
        except Error as e:
            report["ood_skipped"][name] = str(e)
            print(f"warning: skipping OOD set {name}: {e}", file=sys.stderr)
    return ood


def uncertainty_report(cfg, net, x_test, y_test, rule, device, out, freq):
    """Calibration, abstention, OOD, shift and selective numbers (and their figures) for metrics.json.

    freq: the control's pixel-inking frequencies of the training digits (`pixel_rarity`).
    """
    report = {"unc_samples": cfg.unc_samples, "sampler": cfg.sampler, "measure": cfg.measure,
              "threshold": rule.get(cfg.measure), "rule": rule, "ood_skipped": {}}
    ood = load_ood_sets(cfg, report)
    pick, shift, near = shifted_sets(x_test, y_test, cfg.shift_size)
    sets = {"MNIST": x_test} | ood | sets_to_score(shift, near)
    probs = sample_probs_sets(sets, net, cfg.unc_samples, cfg.sampler)  # {name: (S, N, 10)}
    scores = {name: scores_for(p, rule) for name, p in probs.items()}
    mean = probs["MNIST"].mean(0)
    correct = mean.argmax(1) == y_test
    report["calibration"] = cal = evaluate(mean, y_test)
    refused = {name: refuses(scores[name], rule) for name in ["MNIST", *ood]}
    report["abstention"] = {"MNIST": abstention(refused["MNIST"], rule_classes(probs["MNIST"], rule) == y_test)}
    report["abstention"] |= {n: {"refused": float(refused[n].float().mean())} for n in ood}
    report["auroc"] = {n: {m: auroc(scores["MNIST"][m], scores[n][m]) for m in MEASURES} for n in ood}
    report["near_ood_auroc"] = {n: {m: auroc(scores["MNIST"][m], scores[n][m]) for m in MEASURES} for n in near}
    control = rarity_score(x_test, freq)
    report["control_auroc"] = {n: auroc(control, rarity_score(x, freq)) for n, x in (ood | near).items()}
    report["shift"] = shift_report(by_angle(probs, pick), y_test[pick])
    report["selective_measure"] = cfg.selective_measure
    report["selective"] = {m: risk_coverage(scores["MNIST"][m], correct) for m in MEASURES}
    # the article's operating point: refuse 12.5% of MNIST test, then see how much of each set
    article = float(torch.quantile(scores["MNIST"][cfg.measure].double(), 0.875))
    report["at_article_operating_point"] = {"MNIST": 0.125} | {
        n: float((scores[n][cfg.measure] > article).float().mean()) for n in ood}
    print_report(cfg, report, cal, rule)
    if not cfg.no_plots:
        uncertainty_figures(cfg, x_test, y_test, probs, scores, refused, correct, ood, rule, out)
        plot_shift({"bnn_mnist": report["shift"]}, path=out / "shift.png")
        plot_pixel_scales(net, freq, path=out / "posterior_scale.png")
    return report


def print_report(cfg, report, cal, rule):
    a = report["abstention"]
    print(f"calibration: NLL {cal['nll']:.4f}  Brier {cal['brier']:.4f}  ECE {cal['ece']:.4f} "
          f"({cfg.unc_samples} samples)")
    when = " or ".join(f"{m} {'<=' if m == 'max_median_prob' else '>'} {t:.4g}" for m, t in rule.items())
    print(f"refusing when {when}: MNIST refused {a['MNIST']['refused']:.1%}, "
          f"{a['MNIST']['accuracy_accepted']:.2%} right on the rest" +
          "".join(f"; {n} refused {a[n]['refused']:.1%}" for n in a if n != "MNIST"))
    for n, r in (report["auroc"] | report["near_ood_auroc"]).items():
        print(f"AUROC MNIST vs {n}: {cfg.measure} {r[cfg.measure]:.4f} "
              f"(control, pixel rarity: {report['control_auroc'][n]:.4f})")
    sel = report["selective"][cfg.selective_measure]
    print(f"trusting the 95% most certain by {cfg.selective_measure}: {sel['accuracy_kept']:.2%} right; "
          f"AURC x 1000 {1000 * sel['aurc']:.2f}")
    print("rotated test digits (degrees: accuracy / ECE / NLL): " +
          "; ".join(f"{a}: {r['accuracy']:.0%} / {r['ece']:.3f} / {r['nll']:.2f}" for a, r in report["shift"].items()))
    op = report["at_article_operating_point"]
    if len(op) > 1:
        print("refusing 12.5% of MNIST test as the article did: " +
              "; ".join(f"{n} refused {v:.1%}" for n, v in op.items() if n != "MNIST"))


def uncertainty_figures(cfg, x_test, y_test, probs, scores, refused, correct, ood, rule, out):
    measure = cfg.measure
    plot_reliability(probs["MNIST"].mean(0), y_test, path=out / "reliability.png")
    plot_coverage(scores["MNIST"][measure], correct, refused["MNIST"], measure, path=out / "coverage.png")
    plot_histograms({n: scores[n][measure] for n in ["MNIST", *ood]}, measure, rule.get(measure),
                    path=out / "uncertainty_hist.png")
    # Six MNIST digits (the three most and three least certain) and two of each OOD set,
    # shown with the same posterior samples that scored them above.
    order = scores["MNIST"][measure].argsort()
    pick = torch.cat([order[:3], order[-3:]])
    xs = torch.cat([x_test[pick].cpu(), *(x[:2].cpu() for x in ood.values())])
    ps = torch.cat([probs["MNIST"][:, pick], *(probs[n][:, :2] for n in ood)], dim=1)  # (S, N, 10)
    labels = torch.cat([y_test[pick].cpu(), torch.full((len(xs) - len(pick),), -1)])
    u = scores_for(ps, rule)
    plot_examples(xs, ps, u[measure].cpu(), refuses(u, rule).cpu(), labels=labels, path=out / "examples.png")


def load_trained(path):
    """load_guide, with what to run first when there is nothing there yet."""
    if not Path(path).exists():
        raise Error(f"no trained posterior at {path}: train one first (python bnn_mnist.py), or --guide PATH")
    net = load_guide(path)
    if not net.rule:
        raise Error(f"{path} has no refusal rule: save one from a run, or bm.save_guide(path, net, "
                      f"rule=bm.refusal_rule(x_val, net)) with held-out images")
    return net


def command_predict(argv):
    """`bnn_mnist.py predict FILE ...`: answer image files; exit 1 if any could not be answered."""
    p = argparse.ArgumentParser(prog="bnn_mnist.py predict", formatter_class=_HelpFormatter,
                                description="Answer image files of digits with a trained posterior: the class "
                                            "or \"I don't know\", and the article's figure for each.")
    p.add_argument("files", nargs="+", help="PNG or JPEG images, each of one digit (a photo or a scan will do)")
    p.add_argument("--guide", default=str(Path(DEFAULTS.out_dir) / "guide.pt"), help="the trained posterior")
    p.add_argument("--out-dir", default=str(Path(DEFAULTS.out_dir) / "predictions"),
                   help="each file's figure goes here as <file name>.png")
    p.add_argument("--unc-samples", type=_positive(int), default=DEFAULTS.unc_samples, help="posterior samples")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed of the samples")
    p.add_argument("--no-plots", action="store_true", help="write no figures")
    args = p.parse_args(argv)
    net = load_trained(args.guide)
    out = None if args.no_plots else prepare_out_dir(args.out_dir)
    pyro.set_rng_seed(args.seed)
    results = predict_files(args.files, net, args.unc_samples, out)
    if out is not None:
        print(f"figures in {out}")
    if any(isinstance(r, str) for r in results.values()):
        raise SystemExit(1)
    return results


def command_serve(argv):
    """`bnn_mnist.py serve`: the page where you draw a digit, on http://HOST:PORT/ until Ctrl-C."""
    p = argparse.ArgumentParser(prog="bnn_mnist.py serve", formatter_class=_HelpFormatter,
                                description="Serve a local page where you draw a digit (or drop an image) and "
                                            "watch the posterior samples agree or disagree.")
    p.add_argument("--guide", default=str(Path(DEFAULTS.out_dir) / "guide.pt"), help="the trained posterior")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    p.add_argument("--unc-samples", type=_positive(int), default=DEFAULTS.unc_samples, help="posterior samples")
    args = p.parse_args(argv)
    net = load_trained(args.guide)
    try:
        httpd = make_server(net, args.host, args.port, args.unc_samples)
    except OSError as e:
        raise Error(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = httpd.server_address[:2]
    print(f"serving the page on http://{host}:{port}/  (Ctrl-C stops)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        httpd.server_close()


COMMANDS = {"predict": command_predict, "serve": command_serve}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    """Run from the command line (or `main([...])` in-process); returns the metrics dict.

    Expected failures (bad data, files, settings, a diverging run) exit with one line on
    stderr and status 1; 130/143 when interrupted by SIGINT/SIGTERM (a checkpoint is
    saved first). Anything else is a bug and keeps its traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        try:
            return COMMANDS[argv[0]](argv[1:])
        except Error as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
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
    except Error as e:  # only the expected failures: a bug keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()

