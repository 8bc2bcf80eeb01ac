"""Choose the defaults on held-out training digits only: a grid of settings, one table.

    python benchmarks/sweep.py --data-dir DIR --grid kl_weight=0.003,0.1 lr=0.003,0.005 \
        --seeds 0 1 --out docs/contributing/sweeps/kl_prior.jsonl      # trains each setting on each seed (~90 s each)
    python benchmarks/sweep.py --show docs/contributing/sweeps/kl_prior.jsonl --data-dir DIR   # again, no training
    python benchmarks/sweep.py --show docs/contributing/sweeps/*.jsonl --data-dir DIR          # several files, one table

Each run trains on bnn_mnist's training split (its 5,000 held-out digits excluded, as the
command line does) and is scored only on images built from those held-out digits; the test
digits and the reported out-of-distribution sets are never looked at. Columns (means over
seeds): accuracy / NLL / ECE of the held-out digits; AUROC (by the run's --measure) of the
held-out digits against rotated-90, rotated-180, mirrored and overlaid held-out digits and
pixel-shuffled ones (a far set); accuracy, ECE and NLL of the held-out digits rotated by 30,
45 and 60 degrees; selective prediction by predictive entropy (accuracy on the 95% most
certain, AURC x 1000); training seconds. Each run is named by what differs from the current defaults
(a run records every setting it used). A last row gives the model-free control's AUROCs (ink
weighted by how rarely training digits ink each pixel) on the same sets. Every run is appended to --out as one JSON line,
so an interrupted sweep keeps what it measured and --show reprints it.

The rule, fixed before looking: a setting replaces the defaults only if, averaged over the
seeds, it keeps held-out accuracy within 0.1 point of the defaults' (or above), ECE <= 0.01
and NLL no worse than the defaults' + 0.005, and improves all three of: the mean near-OOD
AUROC, ECE at 45 degrees and AURC. Among several such settings, the lowest ECE at 45 degrees.
"""

import argparse
import copy
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bnn_mnist as bm  # noqa: E402
import pyro  # noqa: E402

FIELDS = {f.name: f.type for f in dataclasses.fields(bm.Config)}


def parse_grid(items):
    """["kl_weight=0.003,0.1", "elbo=trace,local"] -> [{"kl_weight": 0.003, "elbo": "trace"}, ...]."""
    axes = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in FIELDS or not values:
            raise SystemExit(f"error: --grid {item!r}: expected FIELD=V1,V2 with FIELD a Config field "
                             f"({', '.join(FIELDS)})")
        kind = type(getattr(bm.DEFAULTS, name)) if getattr(bm.DEFAULTS, name) is not None else float
        try:
            axes[name] = [kind(v) for v in values.split(",")]
        except ValueError:
            raise SystemExit(f"error: --grid {item!r}: {name} takes {kind.__name__} values") from None
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] or [{}]


def validation_sets(x_val, y_val, n, seed=0):
    """Near-OOD, far (pixel-shuffled) and rotated sets, all from the held-out digits."""
    pick, shift, near = bm.shifted_sets(x_val, y_val, n, seed)
    shuffled = x_val[pick][:, torch.randperm(784, generator=torch.Generator().manual_seed(seed))]
    sets = {"val": x_val} | near | {"shuffled": shuffled}
    sets |= {f"rotated {a}": shift[a] for a in (30, 45, 60)}
    return sets, pick


def pooled_probs(sets, nets, num_samples):
    """{name: (S, N, 10)}: num_samples posterior samples shared out over the nets (one net: its own
    samples; several: a mixture of their posteriors, each drawn about equally often)."""
    shares = [num_samples // len(nets) + (i < num_samples % len(nets)) for i in range(len(nets))]
    parts = [bm.sample_probs_sets(sets, net, s) for net, s in zip(nets, shares)]
    return {k: torch.cat([p[k] for p in parts]) for k in sets}


def score_run(nets, x_val, y_val, n, num_samples, measure):
    sets, pick = validation_sets(x_val, y_val, n)
    probs = pooled_probs(sets, nets, num_samples)
    u = {k: bm.uncertainty(p) for k, p in probs.items()}
    ev = bm.evaluate(probs["val"].mean(0), y_val)
    row = {"accuracy": ev["accuracy"], "nll": ev["nll"], "ece": ev["ece"]}
    row |= {f"AUROC {k}": bm.auroc(u["val"][measure], u[k][measure]) for k in [*bm.NEAR_OOD, "shuffled"]}
    for a in (30, 45, 60):
        e = bm.evaluate(probs[f"rotated {a}"].mean(0), y_val[pick])
        row |= {f"acc {a}": e["accuracy"], f"ECE {a}": e["ece"], f"NLL {a}": e["nll"]}
    correct = probs["val"].mean(0).argmax(1) == y_val
    sel = bm.risk_coverage(u["val"]["predictive_entropy"], correct)
    return row | {"kept 95%": sel["accuracy_kept"], "AURC x1000": 1000 * sel["aurc"]}


def control_row(data_dir, n, runs):
    """The pixel counter's AUROCs on the same held-out sets (no model, no seed): the row any
    model's AUROC must beat. Needs the data and the runs' held-out size, not a trained net."""
    cfg = dataclasses.replace(bm.DEFAULTS, data_dir=data_dir,
                              val_size=runs[0]["settings"].get("val_size", bm.DEFAULTS.val_size))
    x, _, x_val, y_val, _, _ = bm.split_data(cfg, torch.device("cpu"))
    sets, _ = validation_sets(x_val, y_val, n)
    freq = bm.pixel_rarity(x)
    digits = bm.rarity_score(sets["val"], freq)
    return {f"AUROC {k}": bm.auroc(digits, bm.rarity_score(sets[k], freq)) for k in [*bm.NEAR_OOD, "shuffled"]}


def run_one(settings, seed, args):
    """Train one setting on one seed (--members nets, seeds seed, seed + 1000, ...); score it once
    per --inflate factor: a list of runs."""
    cfg = dataclasses.replace(bm.DEFAULTS, data_dir=args.data_dir, seed=seed, **settings)
    x, y, x_val, y_val, _, _ = bm.split_data(cfg, torch.device("cpu"))
    nets, seconds = [], 0.0
    for k in range(args.members):
        pyro.set_rng_seed(seed + 1000 * k)
        nets.append(bm.BNN(784, cfg.hidden_size, bm.CLASSES, cfg.init_scale, cfg.prior_scale))
        seconds += bm.train(nets[-1], x, y, progress=False, log=lambda *a: None,
                            **bm.training_kwargs(cfg))["train_seconds"]
    runs = []
    for factor in args.inflate:
        row = score_run([inflated(net, factor, args.inflate_only) for net in nets], x_val, y_val,
                        args.shift_size, cfg.unc_samples, cfg.measure)
        # scoring-time settings, not Config fields; recorded only when not the plain run's
        extra = {"inflate": factor} if factor != 1 else {}
        extra |= {"inflate_only": args.inflate_only} if factor != 1 and args.inflate_only else {}
        extra |= {"members": args.members} if args.members != 1 else {}
        runs.append({"settings": recorded(cfg) | extra, "seed": seed, **row, "train s": seconds})
    return runs


def inflated(net, factor, only=None):
    """A copy of net whose posterior scales are factor times the trained ones (same means): does
    widening q after training buy calibration under shift for less than a higher KL weight does?
    only: widen just the sites whose name starts with it ("fc1": the first layer, whose weights
    multiply the pixels, so its noise grows with ink where digits rarely have any)."""
    if factor == 1:
        return net
    wide = copy.deepcopy(net)
    with torch.no_grad():
        for name, rho in wide.rho.items():
            if only and not name.startswith(only):
                continue
            rho.copy_(bm.inverse_softplus(factor * torch.nn.functional.softplus(rho)))
    return wide


def recorded(cfg):
    """Every setting a run used (not where the data are, not the seed): a table names each run by
    what differs from the defaults of the day it is printed, so it stays right when they change."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data_dir", "seed")}


RETIRED = {"prior": "normal"}  # settings runs recorded that are gone, at the value that is now the only one


def grouped(runs):
    """{name: [runs]}: one group per setting, named by what differs from the defaults ("defaults" when
    nothing does), the first run of each seed only (the same run in two files counts once)."""
    groups = {}
    for r in runs:  # a setting at its default value is the defaults' run: grouped and named with it
        changed = {k: v for k, v in r["settings"].items() if getattr(bm.DEFAULTS, k, RETIRED.get(k)) != v}
        name = ", ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "defaults"
        group = groups.setdefault(name, [])
        if r["seed"] not in [g["seed"] for g in group]:  # one run per seed: files may hold the same run
            group.append(r)
    return groups


def mean_of(rs, cols):
    return {c: sum(r[c] for r in rs) / len(rs) for c in cols}


def table(runs, control=None):
    """Markdown: one row per setting (grouped), each column the mean over its seeds; then the
    control's AUROCs (control_row), when given."""
    cols = [k for k in runs[0] if k not in ("settings", "seed")]
    lines = ["| settings | seeds | " + " | ".join(cols) + " |", "| --- " * (len(cols) + 2) + "|"]
    for name, rs in grouped(runs).items():
        mean = mean_of(rs, cols)
        cells = [f"{mean[c]:.2%}" if c in ("accuracy", "kept 95%") or c.startswith("acc ") else
                 f"{mean[c]:.0f}" if c == "train s" else f"{mean[c]:.4f}" if c in ("nll", "ece") else
                 f"{mean[c]:.3f}" for c in cols]
        lines.append(f"| {name} | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells) + " |")
    if control:
        lines.append("| control (pixel rarity) | | " + " | ".join(f"{control[c]:.3f}" if c in control else ""
                                                            for c in cols) + " |")
    return "\n".join(lines)


# the bars the defaults were asked to reach, drawn on the frontier figure (set on the test digits; these are held-out ones)
TARGETS = {"accuracy": 0.98, "ECE 45": 0.20, "AURC x1000": 0.57}


def plot_frontier(runs, path):
    """Each setting's mean held-out accuracy and AURC against its ECE at 45 degrees, the bars drawn:
    the frontier every knob slides along, and how far the bars' corner lies from it."""
    fig, axes = bm._figure(1, 2, figsize=(11, 4.2))
    for name, rs in grouped(runs).items():
        m = mean_of(rs, ["accuracy", "ECE 45", "AURC x1000"])
        style = dict(marker="*", ms=14, color="C3", zorder=3) if name == "defaults" else \
            dict(marker="o", ms=4 + 2 * len(rs), color="C0", alpha=0.7)
        axes[0, 0].plot(m["ECE 45"], m["accuracy"], ls="", **style)
        axes[0, 1].plot(m["ECE 45"], m["AURC x1000"], ls="", **style)
    for ax, key, better in ((axes[0, 0], "accuracy", "above"), (axes[0, 1], "AURC x1000", "below")):
        ax.axvline(TARGETS["ECE 45"], color="C2", ls="--")
        ax.axhline(TARGETS[key], color="C2", ls="--")
        ax.set(xlabel="ECE, held-out digits rotated 45 degrees", title=f"bars: left of and {better} the dashed lines")
    axes[0, 0].set(ylabel="held-out accuracy", ylim=(0.95, 0.985))  # the untempered runs (91-95%) lie below
    axes[0, 1].set(ylabel="AURC x 1000 (held-out digits)", yscale="log")
    return bm._finish(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=bm.DEFAULTS.data_dir, help="folder holding MNIST/raw")
    p.add_argument("--grid", nargs="*", default=[], help="FIELD=V1,V2 ... (Config fields); their product is run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--shift-size", type=int, default=1500, help="held-out digits per constructed set")
    p.add_argument("--inflate", type=float, nargs="+", default=[1.0],
                   help="also score each trained net with its posterior scales times each factor (no retraining)")
    p.add_argument("--inflate-only", choices=["fc1", "out"],
                   help="with --inflate: widen only this layer's scales (default: every layer's)")
    p.add_argument("--members", type=int, default=1,
                   help="train this many nets per run (other seeds) and pool their posterior samples")
    p.add_argument("--out", help="append each run to this JSON-lines file (and print the table of all of it)")
    p.add_argument("--show", nargs="+", help="print one table of these JSON-lines files; train nothing (the "
                                             "control's row is computed from --data-dir when it holds MNIST)")
    p.add_argument("--frontier", help="with --show: also draw each setting's accuracy and AURC against its "
                                      "ECE at 45 degrees into this image")
    args = p.parse_args(argv)
    if args.show:
        runs = [json.loads(line) for path in args.show for line in Path(path).read_text().splitlines() if line.strip()]
        try:
            control = control_row(args.data_dir, args.shift_size, runs)
        except bm.Error as e:
            control = None
            print(f"(no control row: {e})", file=sys.stderr)
        print(table(runs, control))
        if args.frontier:
            plot_frontier(runs, args.frontier)
        return runs
    runs = []
    for settings in parse_grid(args.grid):
        for seed in args.seeds:
            t0 = time.perf_counter()
            new = run_one(settings, seed, args)
            runs += new
            print(f"{settings or 'defaults'} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in new)
    if args.out:
        runs = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
    print(table(runs, control_row(args.data_dir, args.shift_size, runs)))
    return runs


if __name__ == "__main__":
    main()
