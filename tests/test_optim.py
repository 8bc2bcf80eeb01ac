"""The optimiser and its schedule, pinned against a plain torch.optim.Adam driven by hand.

Every gradient SVI computes is recorded by a tensor hook on the net's parameters; the
same gradients are then fed to torch.optim.Adam with the learning rates the project
promises (the means at lr, the guide's scales rho at lr * scale_lr_factor, each rate
multiplied by lr_decay ** (1 / steps) at every step, steps = min(ceil(N / B), max_batches),
no clipping), and the parameters must come out the same.
"""

import math

import pyro
import pytest
import torch

import bnn_mnist as bm

H = 8


def record_gradients(net):
    """A list that receives {param name: its gradient} once per backward pass."""
    steps, current = [], {}
    names = {id(p): f"{kind}.{k}" for kind in ("loc", "rho") for k, p in getattr(net, kind).items()}

    def hook_for(p):
        def hook(grad):
            current[names[id(p)]] = grad.detach().clone()
            if len(current) == len(names):
                steps.append(dict(current))
                current.clear()
        return hook

    for kind in ("loc", "rho"):
        for p in getattr(net, kind).values():
            p.register_hook(hook_for(p))
    return steps


def start_of(net):
    return {f"{kind}.{k}": p.detach().clone() for kind in ("loc", "rho") for k, p in getattr(net, kind).items()}


def adam_by_hand(start, grads, lr, scale_lr_factor, per_step_decay):
    """torch.optim.Adam on copies of `start`: means at lr, scales at lr * factor, each rate
    multiplied by the per-step decay before each step (as ClippedAdam does); no clipping."""
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt = torch.optim.Adam([
        {"params": [p for k, p in params.items() if k.startswith("loc.")], "lr": lr},
        {"params": [p for k, p in params.items() if k.startswith("rho.")], "lr": lr * scale_lr_factor},
    ])
    for t, g in enumerate(grads, 1):
        for group in opt.param_groups:
            group["lr"] *= per_step_decay
            # ClippedAdam adds eps to sqrt(v) before the bias correction; torch's Adam after it
            group["eps"] = 1e-8 / math.sqrt(1 - 0.999**t)
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step()
    return {k: p.detach() for k, p in params.items()}


def assert_params_equal(net, expected, atol=1e-6):
    got = start_of(net)
    worst = max(float((got[k] - expected[k]).abs().max()) for k in got)
    assert worst < atol, worst


def svi_steps(net, num_datas, lr=0.01, lr_decay=0.8, scale_lr_factor=4.0, **kw):
    """SVI steps on 16 random images, one per num_data; returns the gradients and the optimiser's state."""
    x, y = torch.rand(16, 784, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 10
    svi, optim = bm.make_svi(net, lr, lr_decay, scale_lr_factor=scale_lr_factor, **kw)
    grads = record_gradients(net)
    with pyro.get_param_store().scope():
        for n in num_datas:
            svi.step(x, y, n)
        state = optim.get_state()  # {param name: the torch optimiser's state dict}
    return grads, state


@pytest.mark.parametrize("steps", [1, 4])
def test_make_svi_is_adam_with_per_parameter_rates_and_decay(steps):
    net = bm.BNN(784, H, 10, init_scale=0.05)
    start = start_of(net)
    num_datas = [10**6, 16, 10**5, 16][:steps]  # gradients of very different sizes, far above 10
    grads, _ = svi_steps(net, num_datas)
    assert len(grads) == steps
    assert_params_equal(net, adam_by_hand(start, grads, 0.01, 4.0, 0.8))
    # the hand-driven Adam tells the settings apart: another factor or decay is far off
    for lr, factor, decay in ((0.01, 1.0, 0.8), (0.01, 4.0, 1.0), (0.02, 4.0, 0.8)):
        wrong = adam_by_hand(start, grads, lr, factor, decay)
        assert max(float((start_of(net)[k] - wrong[k]).abs().max()) for k in wrong) > 1e-4


def test_no_gradient_clipping_is_detectable():
    """ClippedAdam clamps each gradient element to clip_norm (10 by default); the project
    promises clip_norm=inf. Gradients of about 1e5 followed by small ones show any clamp."""
    net = bm.BNN(784, H, 10, init_scale=0.05)
    start = start_of(net)
    grads, state = svi_steps(net, [10**6, 16, 16])
    assert max(float(g.abs().max()) for g in grads[0].values()) > 1e4  # the test can see a clamp at 10
    assert_params_equal(net, adam_by_hand(start, grads, 0.01, 4.0, 0.8))
    clamped = [{k: g.clamp(-10, 10) for k, g in step.items()} for step in grads]
    wrong = adam_by_hand(start, clamped, 0.01, 4.0, 0.8)
    assert max(float((start_of(net)[k] - wrong[k]).abs().max()) for k in wrong) > 1e-3
    groups = [s["param_groups"][0] for s in state.values()]
    assert len(groups) == 8 and all(g["clip_norm"] == math.inf for g in groups)


def test_the_rates_after_steps_are_the_promised_ones():
    net = bm.BNN(784, H, 10)
    _, state = svi_steps(net, [100, 100, 100], lr=0.02, lr_decay=0.5, scale_lr_factor=3.0)
    lrs = {name: s["param_groups"][0]["lr"] for name, s in state.items()}
    expected = {f"bnn$$$loc.{k}": 0.02 * 0.5**3 for k in net.loc} | {f"bnn$$$rho.{k}": 0.06 * 0.5**3 for k in net.rho}
    assert lrs == pytest.approx(expected)


def train_and_replay(small_data, *, batch_size, max_batches=None, lr=0.01, lr_decay=0.5, scale_lr_factor=10.0,
                     n=600, epochs=1):
    x, y, _, _ = small_data
    x, y = x[:n], y[:n]
    pyro.set_rng_seed(0)
    net = bm.BNN(784, H, 10, init_scale=0.02)
    start = start_of(net)
    grads = record_gradients(net)
    bm.train(net, x, y, epochs=epochs, batch_size=batch_size, lr=lr, lr_decay=lr_decay,
             scale_lr_factor=scale_lr_factor, max_batches=max_batches, progress=False, log=lambda *a: None)
    steps = min(math.ceil(n / batch_size), max_batches or math.inf)
    assert len(grads) == steps * epochs
    return net, start, grads, steps


@pytest.mark.parametrize("batch_size, max_batches, lr, lr_decay, factor, n", [
    (64, None, 0.01, 0.5, 10.0, 600),   # the defaults' decay and factor: 10 steps
    (64, 3, 0.01, 0.5, 10.0, 600),      # --max-batches: the decay over 3 steps, not 10
    (128, None, 0.02, 0.5, 10.0, 600),  # another batch size: 5 steps
    (200, 2, 0.01, 0.1, 10.0, 600),     # capped, and a strong decay
    (64, None, 0.005, 0.9, 2.0, 300),   # another rate, decay and factor on 300 images
])
def test_train_steps_like_adam_with_the_promised_schedule(small_data, batch_size, max_batches, lr, lr_decay,
                                                          factor, n):
    net, start, grads, steps = train_and_replay(small_data, batch_size=batch_size, max_batches=max_batches, lr=lr,
                                                lr_decay=lr_decay, scale_lr_factor=factor, n=n)
    assert_params_equal(net, adam_by_hand(start, grads, lr, factor, lr_decay ** (1 / steps)))
    if max_batches:  # the decay of the uncapped number of steps is visibly off
        uncapped = adam_by_hand(start, grads, lr, factor, lr_decay ** (1 / math.ceil(n / batch_size)))
        assert max(float((start_of(net)[k] - uncapped[k]).abs().max()) for k in uncapped) > 1e-4


def test_two_epochs_decay_by_lr_decay_squared(small_data):
    """Over two epochs the rate falls by lr_decay per epoch, whatever the number of epochs."""
    net, start, grads, steps = train_and_replay(small_data, batch_size=128, epochs=2, lr_decay=0.3)
    assert steps == 5 and len(grads) == 10
    assert_params_equal(net, adam_by_hand(start, grads, 0.01, 10.0, 0.3 ** (1 / 5)))


def test_make_svi_keeps_the_rate_constant_unless_told_to_decay(small_data):
    """Run by hand as the article does, `make_svi(net, lr)` is Adam at a constant rate."""
    x, y, _, _ = small_data
    losses = []
    for kwargs in ({}, {"lr_decay": 1.0}, {"lr_decay": 0.5}):
        pyro.set_rng_seed(0)
        net = bm.BNN(784, 8, 10)
        with pyro.get_param_store().scope():
            svi, _ = bm.make_svi(net, 0.05, **kwargs)
            losses.append([svi.step(x[:64], y[:64], len(x)) for _ in range(4)])
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_make_svi_hands_its_prior_scale_to_the_local_estimator_too():
    """make_svi(prior_scale=s, elbo="local") scores the KL to N(0, s), as the model it is given."""
    net = bm.BNN(784, 8, 10, init_scale=0.1)  # net.prior_scale stays 1.0
    x, y = torch.rand(16, 784), torch.randint(0, 10, (16,))
    with pyro.get_param_store().scope():
        svi, _ = bm.make_svi(net, 0.01, prior_scale=0.3, elbo="local")
        torch.manual_seed(0)
        got = svi.evaluate_loss(x, y, 100)
    torch.manual_seed(0)
    with pyro.get_param_store().scope():
        expected = bm.local_reparam_loss(None, None, x, y, 100, net=net, prior_scale=0.3).item()
    assert got == pytest.approx(expected, rel=1e-6)
