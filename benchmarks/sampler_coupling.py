"""Why each image takes its own noise: numbers over many images depend on how draws are coupled.

    python benchmarks/sampler_coupling.py --guide out/guide.pt --data-dir DIR [--draws 4]

Every sampler below draws each image's 100 samples exactly from its predictive distribution; they
differ only in what images share. The AUROC of mutual information, 3,000 test digits against
3,000 Fashion-MNIST images, is computed --draws times with different random numbers:
  - shared noise: every image takes the same 100 first-layer noise vectors (and output weights);
  - independent: every image draws its own noise (the exact ideal, 5x slower);
  - pool (bnn_mnist's sample_probs_local): every image takes its own rows of a large pool;
  - weight sets (bnn_mnist's sample_probs): every image sees the same 100 whole networks.
Prints the mean and the sd between draws of each.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bnn_mnist as bm  # noqa: E402


def first_layer(x, net):
    scale = {k: F.softplus(r).detach() for k, r in net.rho.items()}
    mean = x @ net.loc["fc1_weight"].detach().mT + net.loc["fc1_bias"].detach()
    std = (x.square() @ scale["fc1_weight"].square().mT + scale["fc1_bias"].square()).sqrt()
    return mean, std, scale


def by_hand(x, net, num_samples, shared):
    """Per-image exact draws whose first-layer noise is the same for all images, or each one's own."""
    mean, std, scale = first_layer(x, net)
    out = []
    with torch.no_grad():
        for _ in range(num_samples):
            eps = torch.randn(mean.shape[1]) if shared else torch.randn_like(mean)
            h = (mean + std * eps).relu()
            w = net.loc["out_weight"] + scale["out_weight"] * torch.randn_like(scale["out_weight"])
            b = net.loc["out_bias"] + scale["out_bias"] * torch.randn_like(scale["out_bias"])
            out.append((h @ w.mT + b).softmax(-1))
    return torch.stack(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guide", default="out/guide.pt")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--count", type=int, default=3000, help="images of each set")
    args = p.parse_args(argv)
    net = bm.load_guide(args.guide)
    n = args.count
    x = torch.cat([bm.load_mnist(args.data_dir, train=False)[0][:n], bm.load_fashion(args.data_dir)[:n]])
    samplers = {"shared noise": lambda: by_hand(x, net, 100, shared=True),
                "independent": lambda: by_hand(x, net, 100, shared=False),
                "pool (sample_probs_local)": lambda: bm.sample_probs_local(x, net, 100),
                "weight sets (sample_probs)": lambda: bm.sample_probs(x, net, 100)}
    print(f"AUROC of mutual information, {n} test digits against {n} Fashion-MNIST images, {args.draws} draws")
    for name, draw in samplers.items():
        values = []
        for d in range(args.draws):
            torch.manual_seed(100 + d)
            mi = bm.uncertainty(draw())["mutual_information"]
            values.append(bm.auroc(mi[:n], mi[n:]))
        print(f"  {name:28} mean {statistics.mean(values):.4f}   sd between draws {statistics.stdev(values):.4f}")


if __name__ == "__main__":
    main()
