"""The API a notebook user holds: one objective, settings that survive a round trip, a
held-out split and a refusal rule without a Config, and each option doing what it says."""

import inspect

import pyro
import pytest
import torch

import bnn_mnist as bm
from conftest import ready_net

H = 16


def test_the_model_is_the_articles_and_training_tempers_it():
    """model and guide alone: the article's joint (kl_weight 1); make_svi and train: the default objective."""
    defaults = {f.__name__: inspect.signature(f).parameters["kl_weight"].default
                for f in (bm.model, bm.guide, bm.make_svi, bm.train)}
    assert defaults == {"model": 1.0, "guide": 1.0, "make_svi": bm.DEFAULTS.kl_weight, "train": bm.DEFAULTS.kl_weight}


def test_the_svi_make_svi_builds_weights_the_kl_by_the_default(small_data):
    """log p(w) - log q(w) of one trace pair of SVI's own model and guide, against the raw difference."""
    x, y, _, _ = small_data
    net = ready_net(H, init_scale=0.3)
    svi, _ = bm.make_svi(net, lr=0.01)
    guide_tr = pyro.poutine.trace(svi.guide).get_trace(x[:8], y[:8], 600)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(svi.model, trace=guide_tr)).get_trace(x[:8], y[:8], 600)
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    kl_sites = [n for n in net.loc]
    weighted = sum(model_tr.nodes[n]["scale"] * (model_tr.nodes[n]["log_prob_sum"] - guide_tr.nodes[n]["log_prob_sum"])
                   for n in kl_sites)
    raw = sum(model_tr.nodes[n]["log_prob_sum"] - guide_tr.nodes[n]["log_prob_sum"] for n in kl_sites)
    assert all(model_tr.nodes[n]["scale"] == bm.DEFAULTS.kl_weight for n in kl_sites)
    assert all(guide_tr.nodes[n]["scale"] == bm.DEFAULTS.kl_weight for n in kl_sites)
    assert torch.allclose(weighted, bm.DEFAULTS.kl_weight * raw)


def test_expected_entropy_measure_obeys_refuse_quantile(small_data):
    _, _, xt, _ = small_data
    net = ready_net(H, init_scale=0.5)
    pyro.set_rng_seed(1)
    rule = bm.refusal_rule(xt, net, "expected_entropy", quantile=0.9, ambiguity_quantile=0.965, num_samples=8)
    assert list(rule) == ["expected_entropy"]
    pyro.set_rng_seed(1)
    ee = bm.uncertainty(bm.sample_probs_local(xt, net, 8))["expected_entropy"]
    assert rule["expected_entropy"] == pytest.approx(float(torch.quantile(ee.double(), 0.9)))
    assert float(bm.refuses({"expected_entropy": ee}, rule).float().mean()) == pytest.approx(0.1, abs=0.01)


def test_other_measures_keep_both_halves_of_the_rule(small_data):
    _, _, xt, _ = small_data
    net = ready_net(H, init_scale=0.5)
    rule = bm.refusal_rule(xt, net, "mutual_information", 0.9, 0.8, num_samples=8)
    assert set(rule) == {"mutual_information", "expected_entropy"}
    assert set(bm.refusal_rule(xt, net, "max_prob", 0.9, 0, num_samples=8)) == {"max_prob"}


def test_load_guide_restores_prior_scale_and_rule(tmp_path):
    net = ready_net(H)
    net.prior_scale = 0.25
    net.rule = {"mutual_information": 0.01}
    bm.save_guide(tmp_path / "guide.pt", net)
    loaded = bm.load_guide(tmp_path / "guide.pt")
    assert loaded.prior_scale == 0.25 and loaded.rule == {"mutual_information": 0.01}
    bm.save_guide(tmp_path / "other.pt", net, prior_scale=0.5, rule={"max_median_prob": 0.2})  # given: saved
    other = bm.load_guide(tmp_path / "other.pt")
    assert other.prior_scale == 0.5 and other.rule == {"max_median_prob": 0.2}
    trace = pyro.poutine.trace(bm.model).get_trace(torch.rand(2, 784), None, 10, net=loaded)
    assert float(trace.nodes["fc1_weight"]["fn"].base_dist.scale.max()) == 0.25  # the model uses it


def test_train_sets_the_prior_it_was_given_and_keeps_it_otherwise(small_data):
    x, y, _, _ = small_data
    net = bm.BNN(784, H, 10, prior_scale=0.5)
    bm.train(net, x[:64], y[:64], epochs=1, batch_size=64, progress=False, log=lambda *a: None)
    assert net.prior_scale == 0.5
    bm.train(net, x[:64], y[:64], epochs=1, batch_size=64, prior_scale=2.0, progress=False, log=lambda *a: None)
    assert net.prior_scale == 2.0


def test_holdout_split_and_refusal_rule_give_a_rule_without_a_config(small_data):
    x, y, xt, _ = small_data
    x_tr, y_tr, x_val, y_val = bm.holdout_split(x, y, 100)
    assert (len(x_tr), len(x_val)) == (len(x) - 100, 100)
    # disjoint, and together the whole set: every index lands on exactly one side, labels follow
    idx = torch.arange(len(x))
    i_tr, l_tr, i_val, l_val = bm.holdout_split(idx, idx * 10, 100)
    assert torch.equal(torch.cat([i_tr, i_val]).sort().values, idx) and torch.equal(l_val, i_val * 10)
    assert torch.equal(bm.holdout_split(x, y, 100)[2], x_val)  # a fixed draw
    net = bm.BNN(784, H, 10)
    pyro.set_rng_seed(0)
    bm.train(net, x_tr, y_tr, epochs=1, batch_size=64, progress=False, log=lambda *a: None)
    net.rule = bm.refusal_rule(x_val, net)
    assert set(net.rule) == {bm.DEFAULTS.measure, "expected_entropy"}
    answer = bm.predict_or_abstain(xt, net)
    assert answer.shape == (len(xt),) and (answer == -1).any() and (answer >= 0).any()


@pytest.mark.parametrize("size", [-1, 600, 601])
def test_holdout_split_refuses_sizes_that_leave_nothing(small_data, size):
    x, y, _, _ = small_data
    with pytest.raises(bm.Error, match=r"val_size .* must lie in \[0, 600\)"):
        bm.holdout_split(x, y, size)


def test_calling_the_net_checks_its_input_as_predict_prob_does():
    net = ready_net(H)
    x = torch.rand(3, 28, 28)
    assert torch.equal(net(x), net(x.reshape(3, 784)))
    q = (x * 255).to(torch.uint8)
    assert torch.allclose(net(q), net(q.float() / 255), atol=1e-6)
    with pytest.raises(ValueError, match="pixel values must lie in"):
        net(x * 3)
    with pytest.raises(ValueError, match="images must have shape"):
        net(torch.rand(3, 27, 28))


def test_plot_leaves_the_global_rng_alone_and_takes_a_generator(tmp_path):
    probs, image = torch.softmax(torch.randn(20, 10), -1), torch.rand(784)
    state = torch.get_rng_state()
    bm.plot(image, probs, path=tmp_path / "a.png")
    assert torch.equal(torch.get_rng_state(), state)
    dots = [bm.plot(torch.rand(784), probs, generator=torch.Generator().manual_seed(5)).axes[1].collections[-1]
            .get_offsets().data.copy() for _ in range(2)]
    assert (dots[0] == dots[1]).all()


def test_all_names_the_api_the_readme_uses():
    import re

    from conftest import ROOT

    block = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)[0]
    used = set(re.findall(r"\bbm\.(\w+)", block)) | {"prepare_image", "answer", "model", "sample_probs_local"}
    assert used <= set(bm.__all__) and all(hasattr(bm, n) for n in bm.__all__)
    assert len(bm.__all__) == len(set(bm.__all__))


def test_a_second_train_says_it_goes_on_with_a_fresh_optimiser(small_data):
    x, y, _, _ = small_data
    net, lines = bm.BNN(784, H, 10), []
    for _ in range(2):
        bm.train(net, x, y, epochs=1, max_batches=2, progress=False, log=lines.append)
    notes = [t for t in lines if t.startswith("note:")]
    assert notes == ["note: this net is trained already: training goes on from its posterior with a fresh Adam "
                     "and learning-rate schedule (bm.BNN() starts a new one)"] and lines.index(notes[0]) == 1


def test_resuming_a_trained_net_from_its_checkpoint_is_no_second_train(small_data, tmp_path):
    """The note is for a second train() call, not for picking up a checkpoint of the same run."""
    x, y, _, _ = small_data
    net, lines = bm.BNN(784, H, 10), []
    bm.train(net, x, y, epochs=1, max_batches=2, progress=False, log=lines.append, checkpoint_path=tmp_path / "c.pt")
    state = bm.load_checkpoint(tmp_path / "c.pt")
    bm.train(net, x, y, epochs=2, max_batches=2, progress=False, log=lines.append, resume_state=state)
    assert not [t for t in lines if t.startswith("note:")] and len([t for t in lines if t.startswith("epoch")]) == 2


def test_a_guide_of_a_net_with_other_sizes_loads_as_that_net(tmp_path):
    net = bm.BNN(784, 8, 3, prior_scale=0.5)  # three classes, from a notebook
    bm.save_guide(tmp_path / "g.pt", net)
    back = bm.load_guide(tmp_path / "g.pt")
    assert (back.loc["out_weight"].shape, back.prior_scale) == ((3, 8), 0.5)


def test_training_shows_a_progress_bar_unless_told_not_to(small_data, progress_bars):
    """progress=True (the default) leaves the bar to tqdm, which shows it in a terminal; False hides it."""
    x, y, _, _ = small_data
    bm.train(bm.BNN(784, H, 10), x, y, epochs=1, max_batches=2, log=lambda *a: None)
    bm.train(bm.BNN(784, H, 10), x, y, epochs=1, max_batches=2, progress=False, log=lambda *a: None)
    assert [b["kwargs"].get("disable") for b in progress_bars] == [None, True]
    assert all(b["kwargs"]["total"] == 2 for b in progress_bars)  # the bar counts the epoch's steps (capped at 2)
    assert [b["counted"] for b in progress_bars] == [2, 2]  # one per step taken: full when the epoch is
    assert all(b["kwargs"]["leave"] is False for b in progress_bars)  # cleared when its epoch ends (None would leave it)
    bm.train(bm.BNN(784, H, 10), x, y, epochs=0, log=lambda *a: None)  # nothing to do (a finished run resumed)
    assert len(progress_bars) == 3 and all(b["closed"] for b in progress_bars)  # a notebook's next output starts clean


def test_the_progress_bar_shows_the_epochs_running_loss_per_example(small_data, progress_bars):
    x, y, _, _ = small_data
    lines = []
    bm.train(bm.BNN(784, H, 10), x, y, epochs=1, batch_size=16, max_batches=20, log=lines.append)
    shown = [p["loss"] for p in progress_bars[0]["postfix"]]
    assert shown == [lines[-1].split("loss ")[1].split()[0]]  # step 20, the last: the epoch's own number
