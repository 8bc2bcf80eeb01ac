"""bnn_mnist against its peers and a model-free control, on the same images and metric code.

    python -m pip install -r benchmarks/requirements.txt     # laplace-torch, for the Laplace row
    python benchmarks/baselines.py --data-dir DIR --seeds 0 1 2   # the README's table (~10 min a seed)
    python benchmarks/baselines.py --show out/baselines/baselines.json       # print it again
    python benchmarks/baselines.py --data-dir DIR --seeds 0 1 2 --methods bnn \
        --merge-into docs/results/baselines.json                              # bnn_mnist's column only, again

Every system is trained on the same images (bnn_mnist's training split; its held-out digits
are never trained on) and scored by bnn_mnist's own functions from its (S, B, 10) sample
probabilities:
  - control: no model; an image's ink weighted by how rarely training digits ink each
    pixel (`bm.rarity_score`). Only an OOD score: whatever it separates needs no learning;
  - plain MLP: the same 784-1024-10 ReLU network, Adam, 5 epochs; one "sample";
  - 5-MLP ensemble: five such networks from different seeds, one sample each;
  - MC dropout: that network with dropout p=0.5 on the hidden layer, 100 masks at test time;
  - Laplace: laplace-torch's last-layer Kronecker-factored Laplace on the plain MLP, prior
    precision by marginal likelihood, 100 GLM samples;
  - bnn_mnist at its defaults (Config), 100 posterior samples.
OOD AUROC: MNIST test digits against each set, by max_prob for the plain MLP and mutual
information for the rest. Near-OOD sets and the rotation shift are built from the test
digits (`bm.shifted_sets`, --shift-size of them). Selective prediction: each system ranks
the test digits by the measure with the lowest AURC on the held-out training digits.
With several --seeds, each system is trained once per seed and every cell shows the mean
and the standard deviation over the seeds (the control has no seed). Writes
OUT_DIR/baselines.json (every seed's rows) and OUT_DIR/shift.png (accuracy and ECE against
the angle, means over the seeds).
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bnn_mnist as bm  # noqa: E402
import pyro  # noqa: E402

METHODS = ("mlp", "ensemble", "dropout", "laplace", "bnn")


# -----------------------------------------------------------------------------
# The peers: each returns a function {set: (N, 784)} -> {set: (S, N, 10)}.


def train_mlp(x, y, hidden, epochs, batch_size, lr=1e-3, dropout=0.0):
    net = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))
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


def one_sample(nets):
    """Each net gives one sample: (len(nets), N, 10)."""
    return lambda sets: {n: torch.stack([torch.softmax(net(v), -1) for net in nets]) for n, v in sets.items()}


def mc_dropout(net, p, samples):
    """samples dropout masks on the hidden layer; its activations are computed once per set."""
    first, last = net[0], net[3]

    def sample(sets):
        out = {}
        for n, v in sets.items():
            h = torch.relu(first(v))  # (N, H)
            keep = torch.rand(samples, *h.shape) >= p  # (S, N, H): 4 GiB of floats for 10,000 images
            out[n] = torch.softmax(last(h * keep / (1 - p)), -1)  # (S, N, 10)
        return out

    return sample


def laplace_sampler(net, x, y, batch_size, samples):
    from laplace import Laplace

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    la = Laplace(net, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    return lambda sets: {n: torch.cat([la.predictive_samples(v[i : i + 2000], pred_type="glm", n_samples=samples)
                                       for i in range(0, len(v), 2000)], 1) for n, v in sets.items()}


def systems(cfg, x, y, which):
    """{name: (sampler, OOD measure, train seconds)} for the methods asked for."""
    out, kw = {}, dict(hidden=cfg.hidden_size, epochs=cfg.epochs, batch_size=cfg.batch_size)
    t0 = time.perf_counter()
    mlps = [train_mlp(x, y, **kw) for _ in range(5 if "ensemble" in which else 1)]
    t_one = (time.perf_counter() - t0) / len(mlps)
    if "mlp" in which:
        out["plain MLP"] = (one_sample(mlps[:1]), "max_prob", t_one)
    if "ensemble" in which:
        out["5-MLP ensemble"] = (one_sample(mlps), "mutual_information", 5 * t_one)
    if "dropout" in which:
        t0 = time.perf_counter()
        net = train_mlp(x, y, dropout=0.5, **kw)
        out["MC dropout p=0.5"] = (mc_dropout(net, 0.5, cfg.unc_samples), "mutual_information",
                                   time.perf_counter() - t0)
    if "laplace" in which:
        t0 = time.perf_counter()
        sampler = laplace_sampler(mlps[0], x, y, cfg.batch_size, cfg.unc_samples)
        out["Laplace LL KFAC"] = (sampler, "mutual_information", t_one + time.perf_counter() - t0)
    if "bnn" in which:
        t0 = time.perf_counter()
        bnn = bm.BNN(784, cfg.hidden_size, 10, cfg.init_scale, cfg.prior_scale)
        bm.train(bnn, x, y, progress=False, log=lambda *a: None, **bm.training_kwargs(cfg))
        out["bnn_mnist defaults"] = (lambda sets: bm.sample_probs_sets(sets, bnn, cfg.unc_samples), cfg.measure,
                                     time.perf_counter() - t0)
    return out


# -----------------------------------------------------------------------------
# Scoring: one row per system, from the same sets and bnn_mnist's metric functions.


def score(sampler, measure, sets, labels, pick, ood_names):
    """Every column for one system. sets: {name: (N, 784)} holding "val", "MNIST", the OOD
    sets and "rotated A" for every angle but 0; labels: {"val": ..., "MNIST": ...}; pick: the
    test digits that were rotated."""
    with torch.no_grad():
        probs = sampler(sets)
    u = {n: bm.uncertainty(p) for n, p in probs.items()}
    mean = probs["MNIST"].mean(0)
    correct = {n: probs[n].mean(0).argmax(1) == labels[n] for n in ("val", "MNIST")}
    # selective prediction: the measure chosen on the held-out digits, reported on test
    best = min(bm.MEASURES, key=lambda m: bm.risk_coverage(u["val"][m], correct["val"])["aurc"])
    return {"measure": measure, **bm.evaluate(mean, labels["MNIST"]),
            "auroc": {n: bm.auroc(u["MNIST"][measure], u[n][measure]) for n in ood_names},
            "shift": bm.shift_report(bm.by_angle(probs, pick), labels["MNIST"][pick]),
            "selective_measure": best, **bm.risk_coverage(u["MNIST"][best], correct["MNIST"])}


def control_row(freq, sets, ood_names):
    s_in = bm.rarity_score(sets["MNIST"], freq)
    return {"measure": "pixel rarity", "auroc": {n: bm.auroc(s_in, bm.rarity_score(sets[n], freq)) for n in ood_names}}


def mean_sd(values, fmt):
    """'mean' for one value, 'mean ± sd' over seeds."""
    if len(values) == 1:
        return fmt.format(values[0])
    return fmt.format(statistics.mean(values)) + " ± " + fmt.format(statistics.stdev(values))


def print_tables(runs, ood_names):
    """runs: {system: [row per seed]}; markdown tables of every column."""
    def table(title, cols, cell, systems):
        print(f"\n{title}\n| system | " + " | ".join(map(str, cols)) + " |\n" + "| --- " * (len(cols) + 1) + "|")
        for name in systems:
            print(f"| {name} | " + " | ".join(cell(runs[name], c) for c in cols) + " |")

    table("AUROC, MNIST test against each set (higher: better told apart)", ood_names,
          lambda rs, c: mean_sd([r["auroc"][c] for r in rs], "{:.3f}"), list(runs))
    models = [n for n, rs in runs.items() if "shift" in rs[0]]
    pct = {"accuracy": "{:.2%}", "accuracy_kept": "{:.2%}"}
    table("MNIST test and selective prediction", ["accuracy", "nll", "ece", "selective_measure", "accuracy_kept",
                                                  "AURC x 1000", "train_seconds"],
          lambda rs, c: ("/".join(sorted({r[c] for r in rs})) if c == "selective_measure" else
                         mean_sd([1000 * r["aurc"] for r in rs], "{:.2f}") if c == "AURC x 1000" else
                         mean_sd([r[c] for r in rs], pct.get(c, "{:.0f}" if c == "train_seconds" else "{:.4f}"))),
          models)
    for key, fmt in (("accuracy", "{:.1%}"), ("ece", "{:.3f}"), ("nll", "{:.2f}"), ("mutual_information", "{:.3f}")):
        table(f"Rotated test digits: {key.replace('_', ' ')} by angle (degrees)", list(bm.SHIFT_ANGLES),
              lambda rs, c: mean_sd([r["shift"][c][key] for r in rs], fmt), models)


SUMMARY = [  # (label, how to read it from a row, format): the README's table
    ("test accuracy", lambda r: r["accuracy"], "{:.2%}"), ("test NLL", lambda r: r["nll"], "{:.4f}"),
    ("test ECE", lambda r: r["ece"], "{:.4f}"),
    *[(f"AUROC {n}", lambda r, n=n: r["auroc"][n], "{:.3f}") for n in
      ("Fashion-MNIST", "notMNIST", "noise", "rotated 90", "rotated 180", "mirrored", "overlaid")],
    *[(f"ECE, rotated {a} degrees", lambda r, a=a: r["shift"][a]["ece"], "{:.3f}") for a in (30, 45, 60)],
    ("NLL, rotated 45 degrees", lambda r: r["shift"][45]["nll"], "{:.2f}"),
    ("accuracy on the 95% most certain", lambda r: r["accuracy_kept"], "{:.2%}"),
    ("AURC x 1000", lambda r: 1000 * r["aurc"], "{:.2f}"),
    ("training seconds", lambda r: r["train_seconds"], "{:.0f}"),
]


def summary_table(runs):
    """One table, a metric per row and a system per column (mean ± sd over the seeds)."""
    lines = ["| | " + " | ".join(runs) + " |", "| --- " * (len(runs) + 1) + "|"]
    for label, get, fmt in SUMMARY:
        cells = []
        for rs in runs.values():
            try:
                cells.append(mean_sd([get(r) for r in rs], fmt))
            except (KeyError, TypeError):
                cells.append("")  # the control has only AUROCs; a set that was not loaded
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_sets(cfg, x_val, x_test, y_test):
    report = {"ood_skipped": {}}
    ood = bm.load_ood_sets(cfg, report)
    pick, shift, near = bm.shifted_sets(x_test, y_test, cfg.shift_size)
    return {"val": x_val, "MNIST": x_test} | ood | bm.sets_to_score(shift, near), pick, [*ood, *near]


def run_seed(args, seed):
    """Every system's row for one seed: {system: row}."""
    cfg = dataclasses.replace(bm.DEFAULTS, data_dir=args.data_dir, seed=seed, epochs=args.epochs,
                              hidden_size=args.hidden_size, val_size=args.val_size, unc_samples=args.unc_samples,
                              shift_size=args.shift_size, ood=args.ood)
    pyro.set_rng_seed(seed)
    x, y, x_val, y_val, x_test, y_test = bm.split_data(cfg, torch.device("cpu"))
    sets, pick, ood_names = build_sets(cfg, x_val, x_test, y_test)
    labels = {"val": y_val, "MNIST": y_test}
    rows = {"control (pixel rarity)": control_row(bm.pixel_rarity(x), sets, ood_names)}
    for name, (sampler, measure, secs) in systems(cfg, x, y, args.methods.split(",")).items():
        rows[name] = score(sampler, measure, sets, labels, pick, ood_names) | {"train_seconds": secs}
    print(f"seed {seed}: MNIST test {len(x_test)} digits, trained on {len(x)}, held out {len(x_val)}; sets: "
          + ", ".join(f"{n} {len(sets[n])}" for n in ood_names), file=sys.stderr)
    return rows, ood_names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=bm.DEFAULTS.data_dir, help="folder holding MNIST/raw (and the OOD sets)")
    p.add_argument("--out-dir", default="out/baselines", help="baselines.json and shift.png go here")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one training run of every system per seed")
    p.add_argument("--epochs", type=int, default=bm.DEFAULTS.epochs, help="training epochs of every method")
    p.add_argument("--hidden-size", type=int, default=bm.DEFAULTS.hidden_size)
    p.add_argument("--val-size", type=int, default=bm.DEFAULTS.val_size)
    p.add_argument("--unc-samples", type=int, default=bm.DEFAULTS.unc_samples)
    p.add_argument("--shift-size", type=int, default=3000, help="test digits per rotated / mirrored / overlaid set")
    p.add_argument("--ood", default="fashion,notmnist,noise", help="as bnn_mnist.py's --ood")
    p.add_argument("--show", help="print the tables of a baselines.json again; train nothing")
    p.add_argument("--merge-into", help="also replace these systems' rows in this baselines.json (same seeds), "
                                        "keeping the other systems': e.g. bnn_mnist after a change of its defaults")
    args = p.parse_args(argv)
    if args.show:
        saved = json.loads(Path(args.show).read_text())
        runs = {n: [r | {"shift": {int(a): v for a, v in r["shift"].items()}} if "shift" in r else r for r in rs]
                for n, rs in saved["runs"].items()}
        print(f"seeds {' '.join(map(str, saved['seeds']))}; cells: mean ± sd over the seeds\n\n{summary_table(runs)}")
        print_tables(runs, list(next(iter(runs.values()))[0]["auroc"]))
        return runs
    if not set(args.methods.split(",")) <= set(METHODS):
        p.error(f"argument --methods: choose from {', '.join(METHODS)}")
    out = bm.prepare_out_dir(args.out_dir)
    runs = {}
    for seed in args.seeds:
        rows, ood_names = run_seed(args, seed)
        for name, row in rows.items():
            runs.setdefault(name, []).append(row)
    print(f"seeds {' '.join(map(str, args.seeds))}; torch {torch.__version__}, pyro {pyro.__version__}; "
          f"cells: mean ± sd over the seeds")
    print(f"\n{summary_table(runs)}")
    print_tables(runs, ood_names)
    bm.write_json({"seeds": args.seeds, "runs": runs}, out / "baselines.json")
    if args.merge_into:
        saved = json.loads(Path(args.merge_into).read_text())
        if saved["seeds"] != args.seeds:
            p.error(f"argument --merge-into: {args.merge_into} has seeds {saved['seeds']}, this run {args.seeds}")
        bm.write_json(saved | {"runs": saved["runs"] | runs}, args.merge_into)
        print(f"replaced {', '.join(runs)} in {args.merge_into}")
    shift = {n: {a: {k: statistics.mean(r["shift"][a][k] for r in rs) for k in ("accuracy", "ece")}
                 for a in bm.SHIFT_ANGLES} for n, rs in runs.items() if "shift" in rs[0]}
    bm.plot_shift(shift, path=out / "shift.png")
    print(f"\nwrote {out / 'baselines.json'} and {out / 'shift.png'}")
    return runs


if __name__ == "__main__":
    main()
