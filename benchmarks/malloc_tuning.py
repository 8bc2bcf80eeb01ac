"""Does `keep_freed_memory()` (glibc's malloc keeping freed blocks) still pay for itself?

    python benchmarks/malloc_tuning.py                  # 4 processes each side, alternating
    python benchmarks/malloc_tuning.py --steps 300 --processes 6

The tuning is process-wide, so each side runs in processes of its own: one with the tuning,
one without, alternating, each training a fresh default BNN (Trace_ELBO, batch 128) for
--steps steps on random pixels, three rounds a process, the best round kept. Prints the best
seconds per side and their ratio. Nothing computed changes (the tuning only decides whether
freed memory goes back to the kernel). Linux with glibc only; elsewhere it is a no-op.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_process(tuned, steps):
    """Train three rounds in this process; print the round times as JSON."""
    sys.path.insert(0, str(ROOT))
    import pyro
    import torch

    import bnn_mnist as bm

    if tuned:
        bm.keep_freed_memory()
    torch.manual_seed(0)
    x, y = torch.rand(steps * 128, 784), torch.randint(0, 10, (steps * 128,))
    times = []
    for _ in range(3):
        pyro.set_rng_seed(0)
        net = bm.BNN()
        t0 = time.perf_counter()
        bm.train(net, x, y, epochs=1, progress=False, log=lambda *a: None)
        times.append(time.perf_counter() - t0)
    print(json.dumps(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="training steps per round")
    p.add_argument("--processes", type=int, default=4, help="processes per side")
    p.add_argument("--child", choices=("tuned", "plain"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return one_process(args.child == "tuned", args.steps)
    best = {"tuned": [], "plain": []}
    for _ in range(args.processes):
        for side in ("plain", "tuned"):
            out = subprocess.run([sys.executable, __file__, "--child", side, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True).stdout
            best[side] += json.loads(out.strip().splitlines()[-1])
    plain, tuned = min(best["plain"]), min(best["tuned"])
    print(f"{args.steps} training steps, best of {len(best['plain'])} rounds each side")
    print(f"without keep_freed_memory: {plain:.2f} s")
    print(f"with keep_freed_memory:    {tuned:.2f} s")
    print(f"ratio (without / with):    {plain / tuned:.2f}")
    return {"plain": plain, "tuned": tuned}


if __name__ == "__main__":
    main()
