"""Does the file path keep what the network knows? MNIST's test digits as a user would bring them.

    python benchmarks/own_images.py --guide out/guide.pt --data-dir DIR [--count 2000]

For the first --count test digits, with the trained posterior in --guide (100 samples, its own
refusal rule), three ways in:
  - direct: the digits as the data set holds them (the reference);
  - as PNG files: each written as a PNG, read back and prepared by `prepare_image` (grayscale,
    crop to the ink, fit into 20x20, centre by mass);
  - photographed: dark ink on grey paper with noise, at a random size (0.6-2.5 times) and place
    in a 96 x 128 picture, then the same preparation.
And two foreign pictures: every notMNIST-459 letter as its PNG file, and 200 scribbles filling a
pad (random zigzags drawn with a thick pen). Prints accuracy (every image answered), the fraction
refused and the accuracy on the rest.
"""

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bnn_mnist as bm  # noqa: E402
import pyro  # noqa: E402


def as_png(x):
    buffer = io.BytesIO()
    Image.fromarray((x.reshape(28, 28).numpy() * 255).round().astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def photographed(x, rng):
    """A digit (784,) as dark ink on noisy grey paper, resized and placed at random in 96 x 128."""
    size = int(28 * rng.uniform(0.6, 2.5))
    digit = Image.fromarray((x.reshape(28, 28).numpy() * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    paper = np.zeros((96, 128), dtype=np.float32)
    top, left = rng.integers(0, 96 - size + 1) if size < 96 else 0, rng.integers(0, 128 - size + 1)
    patch = np.asarray(digit, dtype=np.float32)[: 96 - top, : 128 - left] / 255
    paper[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
    photo = 0.85 - 0.75 * paper + rng.normal(0, 0.03, paper.shape)
    return np.clip(photo, 0, 1).astype(np.float32)


def scribble(rng):
    """A pad of 280 x 280 covered by a thick random zigzag, black on white."""
    pad = Image.new("L", (280, 280), 255)
    points = [tuple(rng.integers(10, 270, 2).tolist()) for _ in range(14)]
    ImageDraw.Draw(pad).line(points, fill=0, width=18, joint="curve")
    return np.asarray(pad, dtype=np.float32) / 255


def report(name, images, net, labels=None):
    x = torch.stack(images)
    probs = bm.sample_probs_local(x, net, 100)
    refused = bm.refuses(bm.scores_for(probs, net.rule), net.rule)
    line = f"{name:34} {len(x):6d} images   refused {refused.float().mean():6.1%}"
    if labels is not None:
        correct = probs.mean(0).argmax(-1) == labels
        line += f"   accuracy {correct.float().mean():7.2%}   right on the rest {correct[~refused].float().mean():7.2%}"
    print(line, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guide", default="out/guide.pt")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--count", type=int, default=2000, help="test digits to bring in")
    args = p.parse_args(argv)
    net = bm.load_guide(args.guide)
    x, y = bm.load_mnist(args.data_dir, train=False)
    x, y = x[: args.count], y[: args.count]
    rng = np.random.default_rng(0)
    pyro.set_rng_seed(0)
    report("direct (the data set's tensors)", list(x), net, y)
    report("as PNG files, prepared", [bm.prepare_image(as_png(v)) for v in x], net, y)
    report("photographed, prepared", [bm.prepare_image(photographed(v, rng)) for v in x], net, y)
    letters, blank = [], 0
    for f in sorted(Path(args.data_dir, "notMNIST-459").rglob("*.png")):
        try:
            letters.append(bm.prepare_image(f))
        except bm.ImageError:  # a few of the 459 are blank: answered with "no ink"
            blank += 1
    report(f"notMNIST letters ({blank} blank left out)", letters, net)
    report("scribbles filling the pad, prepared", [bm.prepare_image(scribble(rng)) for _ in range(200)], net)


if __name__ == "__main__":
    main()
