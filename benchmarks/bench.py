"""Speed of bnn_mnist against a hand-written plain-PyTorch floor (a benchmark, not a test).

Times, side by side in one process and on the same data:
  - training steps: bnn_mnist's Pyro SVI step vs Bayes-by-backprop written by hand
    (same model, same guide, the same ELBO estimator as --elbo: the sampled KL of Trace_ELBO
    by default, the analytic one with --elbo meanfield, each image's own pre-activations and
    the analytic KL with --elbo local; Adam with the same per-step decay, batch 128);
  - prediction of 10,000 images with 10 posterior samples: bnn_mnist.predict_prob vs one
    vectorised matmul over the samples, written by hand;
  - the uncertainty passes, 10,000 images x 100 samples, by both samplers: weight sets
    (sample_probs) against its hand-written floor (batched matmuls over the samples), and
    each image's own exact draws (sample_probs_local) against its floor (the two first-layer
    matrix products any such sampler needs);
  - with --jit, also Pyro's JitTrace_ELBO (the same estimator, compiled) against the floor.

    python benchmarks/bench.py                      # CPU, a few hundred steps
    python benchmarks/bench.py --full-epoch         # one whole epoch (469 steps) each
    python benchmarks/bench.py --device cuda        # on a GPU
    python benchmarks/bench.py --data-dir DIR   # real MNIST instead of random pixels
    python benchmarks/bench.py --jit                # and Pyro's JitTrace_ELBO

Speed does not depend on the pixel values, so by default the data are random images of
MNIST's size (60,000 training, 10,000 test).
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bnn_mnist as bm  # noqa: E402
import pyro  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_train(net, x, y, steps, batch_size, lr, lr_decay, prior_scale, elbo, scale_lr_factor, kl_weight):
    """Bayes-by-backprop by hand: the same ELBO estimator as bnn_mnist's (sampled or exact KL,
    weighted by kl_weight) and the same Adam (scales at scale_lr_factor times the rate)."""
    n = len(x)
    locs = [p.detach().clone().requires_grad_() for p in net.loc.values()]
    rhos = [p.detach().clone().requires_grad_() for p in net.rho.values()]
    names = list(net.loc)
    opt = torch.optim.Adam([{"params": locs}, {"params": rhos, "lr": lr * scale_lr_factor}], lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, lr_decay)
    perm = torch.randperm(n, device=x.device)
    for step in range(steps):
        i = step % math.ceil(n / batch_size)
        idx = perm[i * batch_size : (i + 1) * batch_size]
        scales = [F.softplus(r) for r in rhos]
        if elbo == "local":  # each image draws its own pre-activations (local reparameterization)
            logits = floor_local_logits(dict(zip(names, locs)), dict(zip(names, scales)), x[idx])
        else:
            w = {k: m + s * torch.randn_like(m) for k, m, s in zip(names, locs, scales)}
            logits = bm.bnn_forward(w, x[idx])
        nll = F.cross_entropy(logits, y[idx], reduction="sum") * (n / len(idx))
        kl = floor_kl(locs, scales, [w[k] for k in names] if elbo == "trace" else None, prior_scale)
        loss = nll + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


def floor_kl(locs, scales, sampled, prior_scale):
    """The KL term for lists of weight tensors: log q(w) - log p(w) at the sampled w (Trace_ELBO),
    or exactly (sampled=None: meanfield, local), KL(N(m, s) || N(0, p)) = log p - log s + (s^2 + m^2) / (2 p^2) - 1/2."""
    log_prior = math.log(prior_scale)
    if sampled is not None:
        return sum((log_prior - s.log() - 0.5 * ((w - m) / s) ** 2 + 0.5 * (w / prior_scale) ** 2).sum()
                   for m, s, w in zip(locs, scales, sampled))
    return sum((log_prior - s.log() + (s * s + m * m) / (2 * prior_scale**2) - 0.5).sum() for m, s in zip(locs, scales))


def floor_local_logits(loc, scale, x):
    """(B, 10): Normal pre-activations with the mean-field moments, one draw per image and layer."""
    mean = x @ loc["fc1_weight"].T + loc["fc1_bias"]  # (B, H)
    std = (x * x @ (scale["fc1_weight"] ** 2).T + scale["fc1_bias"] ** 2).sqrt()
    h = torch.relu(mean + std * torch.randn_like(mean))
    mean = h @ loc["out_weight"].T + loc["out_bias"]  # (B, 10)
    std = (h * h @ (scale["out_weight"] ** 2).T + scale["out_bias"] ** 2).sqrt()
    return mean + std * torch.randn_like(mean)


def floor_predict(locs, scales, x, num_samples):
    """All samples in one batched computation, no chunking: (S, B, 10) probabilities."""
    with torch.no_grad():
        w = {k: locs[k] + scales[k] * torch.randn(num_samples, *locs[k].shape, device=x.device) for k in locs}
        return torch.softmax(bm.bnn_forward(w, x), -1)


def floor_weight_sets(locs, scales, x, num_samples, chunk=10):
    """Weight-set sampling by hand: chunk samples per batched matmul, (S, B, 10) probabilities."""
    return torch.cat([floor_predict(locs, scales, x, min(chunk, num_samples - s)) for s in range(0, num_samples, chunk)])


def floor_local(locs, scales, x):
    """The work every per-image sampler must do: the first layer's mean and variance, (B, H) each."""
    with torch.no_grad():
        return x @ locs["fc1_weight"].T, (x * x) @ (scales["fc1_weight"] ** 2).T


def jit_side(net, x, y, steps, batch_size):
    """bnn_mnist's SVI step with Pyro's JitTrace_ELBO (num_data as a keyword: traced as a constant)."""
    import warnings

    svi, _ = bm.make_svi(net, bm.DEFAULTS.lr)
    svi = pyro.infer.SVI(svi.model, svi.guide, svi.optim, pyro.infer.JitTrace_ELBO())
    perm = torch.randperm(len(x), device=x.device)
    with pyro.get_param_store().scope(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python values it fixes
        for step in range(steps):
            idx = perm[(step * batch_size) % (len(x) - batch_size):][:batch_size]  # full batches: one trace
            svi.step(x[idx], y[idx], num_data=len(x))


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def main(argv=None):
    d = bm.DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=200, help="training steps per timed round")
    p.add_argument("--full-epoch", action="store_true", help="time one whole epoch per side instead")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--num-samples", type=int, default=d.num_samples)
    p.add_argument("--unc-samples", type=int, default=d.unc_samples, help="samples per image for the samplers")
    p.add_argument("--unc-images", type=int, default=10000, help="test images for the samplers")
    p.add_argument("--jit", action="store_true", help="also time Pyro's JitTrace_ELBO")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating timed rounds per side (training and prediction); the best is kept")
    p.add_argument("--data-dir", default=None, help="real MNIST (default: random images of its size)")
    p.add_argument("--elbo", choices=bm.ELBOS, default=d.elbo)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # bnn_mnist.train tunes glibc's malloc on the CPU; do it first so the floor runs under
    # the same allocator settings (see keep_freed_memory).
    bm.keep_freed_memory()
    pyro.set_rng_seed(0)
    if args.data_dir:
        x, y = bm.load_mnist(args.data_dir, True)
        xt, _ = bm.load_mnist(args.data_dir, False)
    else:
        x, y = torch.rand(60000, 784), torch.randint(0, 10, (60000,))
        xt = torch.rand(10000, 784)
    x, y, xt = x.to(device), y.to(device), xt.to(device)
    n_batches = math.ceil(len(x) / args.batch_size)
    steps = n_batches if args.full_epoch else args.steps
    net = bm.BNN(784, d.hidden_size, 10).to(device)
    decay = d.lr_decay ** (1 / n_batches)  # the same per-step decay as bnn_mnist.train

    # --- training: warm up both, then alternate timed rounds so both see the same machine
    kw = dict(bm.training_kwargs(d), epochs=1, batch_size=args.batch_size, elbo=args.elbo, progress=False,
              log=lambda *a: None)
    pyro_side = lambda n: bm.train(net, x, y, **(kw | {"max_batches": n}))  # noqa: E731
    floor_side = lambda n: floor_train(net, x, y, n, args.batch_size, d.lr, decay,  # noqa: E731
                                       d.prior_scale, args.elbo, d.scale_lr_factor, d.kl_weight)
    pyro_side(args.warmup)
    floor_side(args.warmup)
    t_pyro, t_floor, t_jit = math.inf, math.inf, math.inf
    if args.jit:
        jit_side(net, x, y, args.warmup, args.batch_size)
    for _ in range(args.rounds):
        t_pyro = min(t_pyro, timed(lambda: pyro_side(steps), device)[0])
        t_floor = min(t_floor, timed(lambda: floor_side(steps), device)[0])
        if args.jit:
            t_jit = min(t_jit, timed(lambda: jit_side(net, x, y, steps, args.batch_size), device)[0])

    # --- prediction of the whole test set with num_samples samples
    locs = {k: p.detach() for k, p in net.loc.items()}
    scales = {k: F.softplus(p).detach() for k, p in net.rho.items()}
    bm.predict_prob(xt[:100], net, args.num_samples)
    floor_predict(locs, scales, xt[:100], args.num_samples)
    p_pyro, p_floor = math.inf, math.inf
    for _ in range(args.rounds):
        p_pyro = min(p_pyro, timed(lambda: bm.predict_prob(xt, net, args.num_samples), device)[0])
        p_floor = min(p_floor, timed(lambda: floor_predict(locs, scales, xt, args.num_samples).mean(0), device)[0])

    # --- the uncertainty passes: unc_images x unc_samples by both samplers and their floors
    net.trained.fill_(True)
    xu, su = xt[: args.unc_images], args.unc_samples
    sides = {"weight sets": lambda: bm.sample_probs(xu, net, su), "weight-set floor": lambda: floor_weight_sets(
             locs, scales, xu, su), "per-image": lambda: bm.sample_probs_local(xu, net, su),
             "per-image floor": lambda: floor_local(locs, scales, xu)}
    u = dict.fromkeys(sides, math.inf)
    for _ in range(args.rounds):
        for name, fn in sides.items():
            u[name] = min(u[name], timed(fn, device)[0])

    per_epoch = lambda t: t / steps * n_batches  # noqa: E731
    imgs = steps * args.batch_size
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else os.cpu_count()} "
          f"{'' if device.type == 'cuda' else 'cores, ' + str(torch.get_num_threads()) + ' threads'}), "
          f"torch {torch.__version__}, pyro {pyro.__version__}, batch {args.batch_size}, "
          f"best of {args.rounds} rounds of {steps} steps")
    print(f"{'':28}{'bnn_mnist':>12}{'floor':>12}{'ratio':>8}")
    print(f"{'train images/s':28}{imgs / t_pyro:12.0f}{imgs / t_floor:12.0f}{t_pyro / t_floor:8.2f}")
    print(f"{'train s/epoch (469 steps)':28}{per_epoch(t_pyro):12.2f}{per_epoch(t_floor):12.2f}"
          f"{t_pyro / t_floor:8.2f}")
    if args.jit:
        print(f"{'train s/epoch, JitTrace_ELBO':28}{per_epoch(t_jit):12.2f}{per_epoch(t_floor):12.2f}"
              f"{t_jit / t_floor:8.2f}")
    print(f"{'predict s, 10k x ' + str(args.num_samples) + ' samples':28}{p_pyro:12.2f}{p_floor:12.2f}"
          f"{p_pyro / p_floor:8.2f}")
    work = len(xu) * su
    print(f"uncertainty, {len(xu)} images x {su} samples (images x samples per second, seconds):")
    for a, b in (("weight sets", "weight-set floor"), ("per-image", "per-image floor")):
        print(f"  {a:14}{work / u[a]:14.0f}/s {u[a]:8.2f} s   its floor ({b}) {u[b]:8.2f} s   "
              f"ratio {u[a] / u[b]:6.2f}")
    print(f"  per-image is {u['weight sets'] / u['per-image']:.1f}x faster than weight sets")
    print(f"peak RSS {bm.peak_rss_mib() or float('nan'):.0f} MiB"
          + (f", peak CUDA {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda" else ""))
    return {"train_ratio": t_pyro / t_floor, "predict_ratio": p_pyro / p_floor, "jit_ratio": t_jit / t_floor,
            "sampler_speedup": u["weight sets"] / u["per-image"], "samplers": u}


if __name__ == "__main__":
    main()
