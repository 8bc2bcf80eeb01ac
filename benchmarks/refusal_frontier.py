"""How far a trained guide's refusal rule is from "<= 5% refused, >= 99.5% right" (a diagnostic).

For the held-out training digits (the split that set the rule's thresholds) and for the
MNIST test set, it prints the rule's refusals and accuracy on the rest, and what the best
possible thresholds would give at exactly 5% refused: each measure alone, and the best
pair of mutual-information and expected-entropy thresholds on a grid. Nothing in the
defaults is chosen from its test rows; they only say why a target is missed.

    python bnn_mnist.py --data-dir DIR --out-dir out
    python benchmarks/refusal_frontier.py --guide out/guide.pt --data-dir DIR
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bnn_mnist as bm  # noqa: E402


def best_single(u, correct, budget):
    """{measure: accuracy on the rest when its `budget` most uncertain images are refused}."""
    k = len(correct) - int(budget * len(correct))  # images kept
    return {m: float(bm.accuracy_coverage_curve(s, correct)[1][k - 1]) for m, s in u.items()}


def best_pair(u, correct, budget, grid=101):
    """The best accuracy on the rest over rules {MI: t1, EE: t2} (the default rule's shape, t1
    and t2 quantiles 0.90-1.00 of u) refusing at most `budget` of the images."""
    qs = torch.linspace(0.9, 1.0, grid, dtype=torch.double)
    cuts = {m: torch.quantile(u[m].double(), qs).tolist() for m in ("mutual_information", "expected_entropy")}
    best = 0.0
    for t_mi in cuts["mutual_information"]:
        for t_ee in cuts["expected_entropy"]:
            refused = bm.refuses(u, {"mutual_information": t_mi, "expected_entropy": t_ee})
            if int(refused.sum()) <= budget * len(correct):
                best = max(best, float(correct[~refused].float().mean()))
    return best


def report(name, x, y, net, num_samples, budget):
    probs = bm.sample_probs(x, net, num_samples)  # (S, B, 10)
    u = bm.uncertainty(probs)
    correct = probs.mean(0).argmax(-1) == y
    refused = bm.refuses(u, net.rule)
    a = bm.abstention(refused, correct)
    single = best_single(u, correct, budget)
    print(f"{name}: {int((~correct).sum())} errors in {len(y)}; the rule refuses {a['refused']:.2%}, "
          f"{a['accuracy_accepted']:.2%} right on the rest")
    print(f"  at exactly {budget:.0%} refused: " + ", ".join(f"{m} {v:.2%}" for m, v in single.items())
          + f"; best MI/EE pair: {best_pair(u, correct, budget):.2%}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--guide", default="out/guide.pt", help="a guide saved by bnn_mnist.py")
    p.add_argument("--data-dir", default=bm.DEFAULTS.data_dir, help="folder holding MNIST/raw")
    p.add_argument("--val-size", type=int, default=bm.DEFAULTS.val_size, help="the run's --val-size")
    p.add_argument("--unc-samples", type=int, default=bm.DEFAULTS.unc_samples)
    p.add_argument("--budget", type=float, default=0.05, help="the share of MNIST digits one may refuse")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.budget < 1:
        p.error(f"argument --budget: must be in (0, 1), got {args.budget}")
    torch.manual_seed(args.seed)
    net = bm.load_guide(args.guide)
    if not getattr(net, "rule", None):
        raise bm.Error(f"{args.guide} holds no refusal rule (was it trained with --val-size 0?)")
    cfg = bm.Config(data_dir=args.data_dir, val_size=args.val_size)
    _, _, x_val, y_val, x_test, y_test = bm.split_data(cfg, "cpu")
    report("held-out training digits", x_val, y_val, net, args.unc_samples, args.budget)
    report("MNIST test digits", x_test, y_test, net, args.unc_samples, args.budget)


if __name__ == "__main__":
    try:
        main()
    except bm.Error as e:  # a missing guide or data folder: one line, not a traceback
        sys.exit(f"error: {e}")
