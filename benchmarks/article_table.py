"""What each departure from the article buys: the article as written, the article with the KL
counted once per data set, and today's defaults, each run end to end by the command line.

    python benchmarks/article_table.py --data-dir DIR --seeds 0 1 2     # 9 runs, about 15 minutes on 2 cores
    python benchmarks/article_table.py --show                            # the table again, from the saved metrics
    python benchmarks/article_table.py --departures                      # each departure and the flag undoing it

Each run is `python bnn_mnist.py --data-dir DIR --seed S` plus the setting's flags, in a
subprocess of its own, timed whole (wall seconds, start to exit); its metrics.json is copied to
docs/results/article/SETTING-seedS.json (with the wall time added), which --show reads. The
article's own numbers (its notebook's printed results) stand in the first column.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "article"
SETTINGS = {  # name -> the command line's flags
    "article": ["--article"],
    "article-kl-once": ["--article", "--kl-weight", "1"],
    "defaults": [],
}
TITLES = {"article": "the article as written (`--article`)",
          "article-kl-once": "the article, KL once per data set (`--article --kl-weight 1`)",
          "defaults": "today's defaults"}
# the article's notebook (github.com/paraschopra/bayesian-neural-network-mnist): 89% forced;
# 1,250 of 10,000 test digits skipped, 96% right on the rest; 363 of 459 notMNIST letters skipped
ARTICLE_REPORTED = {"test accuracy": "89%", "MNIST refused": "12.5%", "accuracy on the rest": "96%",
                    "notMNIST refused": "79.1%"}


def run_one(name, seed, data_dir, runs_dir):
    out = Path(runs_dir) / f"{name}-seed{seed}"
    cmd = [sys.executable, str(ROOT / "bnn_mnist.py"), "--data-dir", data_dir, "--out-dir", str(out),
           "--seed", str(seed), *SETTINGS[name]]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - t0
    metrics["command"] = " ".join(["python bnn_mnist.py", "--data-dir DIR", "--seed", str(seed), *SETTINGS[name]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}-seed{seed}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"  {name} seed {seed}: accuracy {metrics['test_accuracy']:.4f}, {metrics['wall_seconds']:.0f} s "
          f"({metrics['train_seconds']:.0f} s training)", flush=True)


# Each departure of today's defaults from the article: what, today's value, the article's, the flag
# that gives the article's back (all of them together: --article). Values are read from bnn_mnist.
DEPARTURES = [
    ("which KL per step", "the KL counted once per data set: the minibatch NLL scaled by N / B",
     "the whole KL once per minibatch (469 times too heavy)", "kl_per_batch"),
    ("KL weight (a tempered posterior)", None, None, "kl_weight"),
    ("Adam's learning rate", None, None, "lr"),
    ("its decay over each epoch", None, None, "lr_decay"),
    ("the scales' learning rate, a multiple of the means'", None, None, "scale_lr_factor"),
    ("the guide's start", "nn.Linear's init, scales 0.001", "means and rho drawn from N(0, 1)", "init"),
    ("training digits held out to set the refusal rule", None, None, "val_size"),
    ("the forced prediction averages", "probabilities (the posterior predictive)", "logits", "average"),
    ("the refusal rule", "mutual information above its 98% quantile, or expected entropy above its 96.5% "
     "quantile, on the held-out digits", "refuse unless some class's median probability exceeds 0.2", "rule"),
]


def flag(name, value):
    return f"`--{name.replace('_', '-')}`" if value is True else f"`--{name.replace('_', '-')} {value}`"


def departures():
    import bnn_mnist as bm

    print("| departure | today's default | the article's | flag giving the article's back |")
    print("| --- | --- | --- | --- |")
    for what, today, article, name in DEPARTURES:
        today = today or getattr(bm.DEFAULTS, name)
        article = article or bm.ARTICLE[name]
        print(f"| {what} | {today} | {article} | {flag(name, bm.ARTICLE[name])} |")


ROWS = {  # row -> (metrics -> value, format)
    "test accuracy": (lambda m: m["test_accuracy"], "{:.2%}"),
    "test NLL": (lambda m: m["test_nll"], "{:.3f}"),
    "test ECE": (lambda m: m["test_ece"], "{:.4f}"),
    "MNIST refused": (lambda m: m["abstention"]["MNIST"]["refused"], "{:.1%}"),
    "accuracy on the rest": (lambda m: m["abstention"]["MNIST"]["accuracy_accepted"], "{:.2%}"),
    "notMNIST refused": (lambda m: m["abstention"]["notMNIST"]["refused"], "{:.1%}"),
    "Fashion-MNIST refused": (lambda m: m["abstention"]["Fashion-MNIST"]["refused"], "{:.1%}"),
    "AUROC Fashion-MNIST": (lambda m: m["auroc"]["Fashion-MNIST"][m["measure"]], "{:.3f}"),
    "mean near-OOD AUROC": (lambda m: statistics.mean(r[m["measure"]] for r in m["near_ood_auroc"].values()),
                            "{:.3f}"),
    "ECE, rotated 45 degrees": (lambda m: m["shift"]["45"]["ece"], "{:.3f}"),
    "AURC x 1000": (lambda m: 1000 * m["selective"][m["selective_measure"]]["aurc"], "{:.2f}"),
    "training seconds": (lambda m: m["train_seconds"], "{:.0f}"),
    "whole run, seconds": (lambda m: m["wall_seconds"], "{:.0f}"),
}


# the model-free control beside each AUROC: ink weighted by how rarely training digits ink each pixel
# (`bm.rarity_score`, in every run's metrics.json as control_auroc; taken from the defaults' runs)
CONTROL = {
    "AUROC Fashion-MNIST": lambda m: m["control_auroc"]["Fashion-MNIST"],
    "mean near-OOD AUROC": lambda m: statistics.mean(m["control_auroc"][n] for n in m["near_ood_auroc"]),
}


def cell(values, fmt):
    mean = fmt.format(statistics.mean(values))
    if len(values) < 2:
        return mean
    sd = fmt.format(statistics.stdev(values)).rstrip("%")
    return f"{mean} ± {sd}" + ("%" if fmt.endswith("%}") else "")


def show():
    runs = {name: [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{name}-seed*.json"))] for name in SETTINGS}
    runs = {n: r for n, r in runs.items() if r}
    seeds = sorted({m["seed"] for r in runs.values() for m in r})
    print(f"Mean ± sd over seeds {', '.join(map(str, seeds))}; the article's column is what its notebook printed; "
          f"the control is no model at all (pixel rarity).\n")
    print("| | the article's reported | " + " | ".join(TITLES[n] for n in runs) + " | control (pixel rarity) |")
    print("| --- | --- | " + " | ".join("---" for _ in runs) + " | --- |")
    for row, (get, fmt) in ROWS.items():
        control = cell([CONTROL[row](m) for m in runs["defaults"]], fmt) if row in CONTROL and "defaults" in runs else ""
        print(f"| {row} | {ARTICLE_REPORTED.get(row, '')} | " +
              " | ".join(cell([get(m) for m in r], fmt) for r in runs.values()) + f" | {control} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default="data", help="MNIST (and notMNIST-459, Fashion-MNIST) as bnn_mnist.py reads them")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    p.add_argument("--runs-dir", default=str(ROOT / "out" / "article_table"), help="each run's --out-dir goes here")
    p.add_argument("--show", action="store_true", help="print the table from docs/results/article/ and stop")
    p.add_argument("--departures", action="store_true", help="print the departures from the article and stop")
    args = p.parse_args(argv)
    if args.departures:
        sys.path.insert(0, str(ROOT))
        return departures()
    if not args.show:
        for seed in args.seeds:
            for name in args.settings:
                run_one(name, seed, args.data_dir, args.runs_dir)
    show()


if __name__ == "__main__":
    main()
