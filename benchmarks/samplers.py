"""The uncertainty report from both samplers, on the same trained posteriors.

    python benchmarks/samplers.py --data-dir DIR                 # the default runs of article_table.py
    python benchmarks/samplers.py --data-dir DIR --guides out/run0/guide.pt out/run1/guide.pt

For each saved guide (by default the three default runs that benchmarks/article_table.py leaves in
out/article_table/defaults-seedS/), the refusal rule is fitted again on the held-out digits and the
whole uncertainty report recomputed with each image's own exact draws (`--sampler local`, the
default) and with whole weight sets (`--sampler weights`), --draws times each with different random
numbers. A number is first averaged over a guide's draws; the table gives the mean ± sd of those
over the guides (the seed-to-seed spread), the gap between the two samplers' means in units of the
larger of those sds (below 1: within the seed-to-seed spread), and the typical sd between two draws
of one sampler on one guide (how much 100 samples move a number by themselves).
"""

import argparse
import contextlib
import dataclasses
import io
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bnn_mnist as bm  # noqa: E402
import pyro  # noqa: E402


def numbers(report):
    """The report's numbers worth comparing, flat: {name: value}."""
    m = report["measure"]
    out = {f"rule: {k}": v for k, v in report["rule"].items()}
    out |= {"NLL (100 samples)": report["calibration"]["nll"], "ECE (100 samples)": report["calibration"]["ece"]}
    out |= {f"{n} refused": a["refused"] for n, a in report["abstention"].items()}
    out["accuracy on the accepted"] = report["abstention"]["MNIST"]["accuracy_accepted"]
    out |= {f"AUROC {n}": r[m] for n, r in (report["auroc"] | report["near_ood_auroc"]).items()}
    out |= {f"ECE rotated {a}": report["shift"][a]["ece"] for a in (30, 45, 60)}
    out["AURC x 1000"] = 1000 * report["selective"][report["selective_measure"]]["aurc"]
    return out


def score(net, data, sampler, data_dir, seed):
    """One draw of the rule and the report for net; data: bm.split_data's tensors (loaded once)."""
    cfg = dataclasses.replace(bm.DEFAULTS, data_dir=data_dir, sampler=sampler, no_plots=True, seed=seed)
    device = torch.device("cpu")
    x_train, _, x_val, _, x_test, y_test = data
    pyro.set_rng_seed(seed)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rule = bm.refusal_rule(x_val, net, cfg.measure, cfg.refuse_quantile, cfg.ambiguity_quantile,
                               cfg.unc_samples, sampler)
        report = bm.uncertainty_report(cfg, net, x_test, y_test, rule, device, None, bm.pixel_rarity(x_train))
    return numbers(report), time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--draws", type=int, default=2, help="reports per guide and sampler, each from other random numbers")
    p.add_argument("--guides", nargs="+",
                   default=[str(ROOT / f"out/article_table/defaults-seed{s}/guide.pt") for s in (0, 1, 2)])
    args = p.parse_args(argv)
    results = {s: [] for s in bm.SAMPLERS}  # per sampler: per guide, a list of draws
    seconds = {s: [] for s in bm.SAMPLERS}
    data = bm.split_data(dataclasses.replace(bm.DEFAULTS, data_dir=args.data_dir), torch.device("cpu"))
    for g, guide in enumerate(args.guides):
        net = bm.load_guide(guide)
        for sampler in bm.SAMPLERS:
            results[sampler].append([])
            for d in range(args.draws):
                nums, sec = score(net, data, sampler, args.data_dir, 1000 * d + g)
                results[sampler][-1].append(nums)
                seconds[sampler].append(sec)
                print(f"{guide}: {sampler}, draw {d}: {sec:.1f} s", file=sys.stderr)
    print(f"{len(args.guides)} trained posteriors, {args.draws} draws each; mean ± sd over the posteriors of each's "
          f"mean over its draws; gap = |difference of the means| / larger sd; draw sd: between draws on one posterior\n")
    print("| number | local (per-image draws) | weights (weight sets) | gap | draw sd, local / weights |")
    print("| --- | --- | --- | --- | --- |")
    for key in results["local"][0][0]:
        per_guide = {s: [statistics.mean(d[key] for d in draws) for draws in results[s]] for s in bm.SAMPLERS}
        draw_sd = {s: statistics.mean(statistics.stdev(d[key] for d in draws) if len(draws) > 1 else 0
                                      for draws in results[s]) for s in bm.SAMPLERS}
        a, b = per_guide["local"], per_guide["weights"]
        sd = max(statistics.stdev(a), statistics.stdev(b)) if len(a) > 1 else float("nan")
        gap = abs(statistics.mean(a) - statistics.mean(b)) / sd if sd > 0 else float("nan")
        print(f"| {key} | {statistics.mean(a):.4f} ± {statistics.stdev(a) if len(a) > 1 else 0:.4f} | "
              f"{statistics.mean(b):.4f} ± {statistics.stdev(b) if len(b) > 1 else 0:.4f} | {gap:.2f} | "
              f"{draw_sd['local']:.4f} / {draw_sd['weights']:.4f} |")
    print(f"| seconds (rule and report) | {statistics.mean(seconds['local']):.1f} | "
          f"{statistics.mean(seconds['weights']):.1f} | |")
    return results


if __name__ == "__main__":
    main()
