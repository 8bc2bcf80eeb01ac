"""Does a KL warm-up rescue the article's (untempered) ELBO in 5 epochs? A probe, not a feature.

    python benchmarks/warmup_probe.py --data-dir DIR --kl-weight 1 --warmup-epochs 3

(Its fan-in prior rows in docs/contributing/sweeps/warmup.jsonl came from commit 605e10c, which still had
`--prior fanin`; that prior lost its selection and is gone.)

Trains like `bnn_mnist.train` (the same split, optimiser, per-step decay and estimator), except
that the KL weight rises linearly from 0 to --kl-weight over the first --warmup-epochs epochs
(Pyro's SVI hands step keyword arguments to the loss, so kl_weight can change per step), then
scores the net on the held-out digits exactly as benchmarks/sweep.py does and prints one
JSON line of the same columns. With --warmup-epochs 0 it is the sweep's run without warm-up.
"""

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bnn_mnist as bm  # noqa: E402
from sweep import recorded, score_run  # noqa: E402


def train_with_warmup(net, x, y, cfg, warmup_epochs):
    """bnn_mnist.train's epochs (`bm.train_epoch`; x: (N, 784), y: (N,); cfg's optimiser, decay and
    estimator), with the KL weight cfg.kl_weight * min(1, step / (warmup_epochs * steps per epoch)).
    Without train's checkpoints and NaN checks: a probe needs neither. warmup_epochs 0: exactly train."""
    steps = math.ceil(len(x) / cfg.batch_size)
    svi, _ = bm.make_svi(net, cfg.lr, lr_decay=cfg.lr_decay ** (1 / steps), elbo=cfg.elbo,
                         scale_lr_factor=cfg.scale_lr_factor, kl_weight=cfg.kl_weight)
    done, ramp = itertools.count(), warmup_epochs * steps
    # what train_epoch steps: the same SVI, handed each step's KL weight (SVI passes it to the loss)
    ramped = SimpleNamespace(step=lambda *batch: svi.step(
        *batch, kl_weight=cfg.kl_weight * (min(1.0, next(done) / ramp) if ramp else 1.0)))
    with pyro.get_param_store().scope():
        for _ in range(cfg.epochs):
            bm.train_epoch(ramped, x, y, cfg.batch_size, {"perm": None, "step": 0, "loss_sum": 0.0}, steps)
    net.trained.fill_(True)  # what bnn_mnist.train marks at its end


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=bm.DEFAULTS.data_dir)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--elbo", choices=bm.ELBOS, default="local")
    p.add_argument("--warmup-epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=bm.DEFAULTS.lr)
    p.add_argument("--lr-decay", type=float, default=bm.DEFAULTS.lr_decay)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift-size", type=int, default=1500, help="held-out digits per constructed set (as sweep.py)")
    args = p.parse_args(argv)
    cfg = dataclasses.replace(bm.DEFAULTS, data_dir=args.data_dir, kl_weight=args.kl_weight,
                              elbo=args.elbo, lr=args.lr, lr_decay=args.lr_decay, seed=args.seed)
    pyro.set_rng_seed(cfg.seed)
    x, y, x_val, y_val, _, _ = bm.split_data(cfg, torch.device("cpu"))
    net = bm.BNN(784, cfg.hidden_size, bm.CLASSES, cfg.init_scale, cfg.prior_scale)
    t0 = time.perf_counter()
    train_with_warmup(net, x, y, cfg, args.warmup_epochs)
    seconds = time.perf_counter() - t0
    row = {"settings": recorded(cfg) | {"warmup_epochs": args.warmup_epochs}, "seed": cfg.seed, **score_run([net], x_val, y_val, args.shift_size, cfg.unc_samples, cfg.measure),
           "train s": seconds}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
