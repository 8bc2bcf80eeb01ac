"""bnn_mnist against its peers at saying "I don't know", in one command and one run.

    python -m pip install -r benchmarks/requirements.txt     # laplace-torch, for the Laplace row
    python benchmarks/baselines.py --data-dir ../shared/data

Every method is trained on the same images (bnn_mnist's training split, its held-out
images excluded) and scored by the same code (bnn_mnist's metrics), from its (S, B, 10)
sample probabilities:
  - plain MLP: the same 784-1024-10 ReLU network, Adam, 5 epochs; one "sample";
  - Laplace: laplace-torch's last-layer Kronecker-factored Laplace on that MLP, prior
    precision by marginal likelihood, 100 GLM samples;
  - bnn_mnist at its defaults (Config), its own default measure and threshold.
Each refuses above its own threshold: the 95% quantile of its measure on the held-out
training images (bnn_mnist: its own refusal rule, mutual information above its 98% quantile
or expected entropy above its 96.5%). Rows: accuracy, NLL and ECE on MNIST
test; AUROC of MNIST test against each out-of-distribution set; the share refused of each.
"""

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bnn_mnist as bm  # noqa: E402
import pyro  # noqa: E402


def mlp(hidden):
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train_mlp(x, y, hidden, epochs, batch_size, lr=1e-3):
    net = mlp(hidden)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def fit_laplace(net, x, y, batch_size):
    from laplace import Laplace

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    la = Laplace(net, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    return la


def methods(cfg, x, y, which):
    """{name: (sample_fn, measure, {measure: quantile} refusal rule, train seconds)}; sample_fn(x) -> (S, B, 10)."""
    out = {}
    if "mlp" in which or "laplace" in which:
        t0 = time.perf_counter()
        net = train_mlp(x, y, cfg.hidden_size, cfg.epochs, cfg.batch_size)
        t_mlp = time.perf_counter() - t0
        out["plain MLP"] = (lambda v: torch.softmax(net(v), -1)[None], "max_prob", {"max_prob": 0.95}, t_mlp)
    if "laplace" in which:
        t0 = time.perf_counter()
        la = fit_laplace(net, x, y, cfg.batch_size)
        t_la = t_mlp + time.perf_counter() - t0
        out["Laplace (last layer, KFAC)"] = (
            lambda v: torch.cat([la.predictive_samples(v[i : i + 2000], pred_type="glm", n_samples=100)
                                 for i in range(0, len(v), 2000)], 1), "mutual_information",
            {"mutual_information": 0.95}, t_la)
    if "bnn" in which:
        t0 = time.perf_counter()
        bnn = bm.BNN(784, cfg.hidden_size, 10, cfg.init_scale)
        bm.train(bnn, x, y, progress=False, log=lambda *a: None, **bm.training_kwargs(cfg))
        out["bnn_mnist defaults"] = (lambda v: bm.sample_probs(v, bnn, cfg.unc_samples), cfg.measure,
                                     {cfg.measure: cfg.refuse_quantile, "expected_entropy": cfg.ambiguity_quantile},
                                     time.perf_counter() - t0)
    return out


def score(sample_fn, measure, quantiles, x_val, x_test, y_test, ood):
    """One row of the table; refusals by the method's own rule, thresholds from the held-out images."""
    with torch.no_grad():
        probs = {name: sample_fn(v) for name, v in {"val": x_val, "MNIST": x_test, **ood}.items()}
    u = {name: bm.uncertainty(p) for name, p in probs.items()}
    rule = bm.thresholds(u["val"], quantiles)
    ev = bm.evaluate(probs["MNIST"].mean(0), y_test)
    row = {"accuracy": ev["accuracy"], "nll": ev["nll"], "ece": ev["ece"]}
    for name in ood:
        row[f"AUROC {name}"] = bm.auroc(u["MNIST"][measure], u[name][measure])
    for name in ["MNIST", *ood]:
        row[f"refused {name}"] = float(bm.refuses(u[name], rule).float().mean())
    correct = probs["MNIST"].mean(0).argmax(1) == y_test
    row["right on accepted MNIST"] = bm.abstention(bm.refuses(u["MNIST"], rule), correct)["accuracy_accepted"]
    return row


def print_table(rows, seconds):
    cols = list(next(iter(rows.values())))
    print("| system | " + " | ".join(cols) + " | train s |")
    print("| --- " * (len(cols) + 2) + "|")
    for name, row in rows.items():
        cells = [f"{v:.2%}" if k in ("accuracy",) or k.startswith(("refused", "right")) else f"{v:.3f}"
                 for k, v in row.items()]
        print(f"| {name} | " + " | ".join(cells) + f" | {seconds[name]:.0f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=bm.DEFAULTS.data_dir, help="folder holding MNIST/raw (and the OOD sets)")
    p.add_argument("--methods", default="mlp,laplace,bnn", help="comma-separated subset of mlp, laplace, bnn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=bm.DEFAULTS.epochs, help="training epochs of every method")
    p.add_argument("--hidden-size", type=int, default=bm.DEFAULTS.hidden_size)
    p.add_argument("--val-size", type=int, default=bm.DEFAULTS.val_size)
    p.add_argument("--unc-samples", type=int, default=bm.DEFAULTS.unc_samples)
    p.add_argument("--ood", default="fashion,notmnist,noise", help="as bnn_mnist.py's --ood")
    args = p.parse_args(argv)
    cfg = dataclasses.replace(bm.DEFAULTS, data_dir=args.data_dir, seed=args.seed, epochs=args.epochs,
                              hidden_size=args.hidden_size, val_size=args.val_size, unc_samples=args.unc_samples,
                              ood=args.ood)
    pyro.set_rng_seed(cfg.seed)
    x, y, x_val, _, x_test, y_test = bm.split_data(cfg, torch.device("cpu"))
    report = {"ood_skipped": {}}
    ood = bm.load_ood_sets(cfg, report)
    rows, seconds = {}, {}
    for name, (fn, measure, q, secs) in methods(cfg, x, y, args.methods.split(",")).items():
        rows[f"{name} ({measure})"] = score(fn, measure, q, x_val, x_test, y_test, ood)
        seconds[f"{name} ({measure})"] = secs
    print(f"MNIST test {len(x_test)}, trained on {len(x)}; OOD: "
          + ", ".join(f"{k} {len(v)}" for k, v in ood.items()) + f"; seed {cfg.seed}; "
          f"torch {torch.__version__}, pyro {pyro.__version__}")
    print_table(rows, seconds)
    return rows


if __name__ == "__main__":
    main()
