"""Mutation testing: apply deliberate one-line bugs to bnn_mnist.py, one at a time, and run the
whole test suite against each; a mutant the suite does not fail "survives".

    python tests/mutate.py                 # every mutant (about 30 minutes on 2 cores)
    python tests/mutate.py --only 3 17     # some of them
    python tests/mutate.py --list          # what they are

Each run copies the project into a temporary folder, so the working tree is never touched.
Tests run fastest-first and stop at the first failure (-x), so a killed mutant costs
seconds and a survivor costs the whole suite. This is a tool to run by hand, not part of CI.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# fastest first; the real-data integration test is left out (it needs MNIST)
ORDER = ["test_mutants.py", "test_article.py", "test_sampler.py", "test_own_images.py", "test_shift.py", "test_promises.py", "test_optim.py", "test_uncertainty.py", "test_inputs.py", "test_api.py",
         "test_data.py", "test_flags.py", "test_model.py",
         "test_trust.py", "test_ood_data.py", "test_robust.py", "test_cli.py", "test_notebook.py",
         "test_readme.py", "test_tutorial.py", "test_bench.py"]

# (area, what the bug is, exact text in bnn_mnist.py, its replacement)
MUTANTS = [
    ("training", "svi.step without the training-set size (the article's KL bug)",
     "loss = svi.step(x_train[idx], y_train[idx], None if kl_per_batch else num_data)",
     "loss = svi.step(x_train[idx], y_train[idx])"),
    ("training", "loss per example divided by the batch size",
     'state["loss_sum"] += loss / num_data', 'state["loss_sum"] += loss / len(idx)'),
    ("training", "the last partial batch dropped",
     "steps = math.ceil(len(x_train) / batch_size)", "steps = len(x_train) // batch_size"),
    ("training", "batches one image short",
     'idx = state["perm"][step * batch_size : (step + 1) * batch_size]',
     'idx = state["perm"][step * batch_size : (step + 1) * batch_size - 1]'),
    ("training", "no shuffling",
     'state["perm"] = torch.randperm(num_data, device=x_train.device)',
     'state["perm"] = torch.arange(num_data, device=x_train.device)'),
    ("training", "the epoch loss averaged over the data set instead of the steps",
     'return state["loss_sum"] / steps', 'return state["loss_sum"] / num_data'),
    ("training", "--max-batches ignored",
     "steps = min(steps, max_batches) if max_batches else steps", "steps = steps"),
    ("training", "the per-epoch decay applied per step",
     "lr_decay ** (1 / steps), net.prior_scale, elbo", "lr_decay, net.prior_scale, elbo"),
    ("training", "the next epoch keeps the old shuffle",
     's.update(epoch=s["epoch"] + 1, step=0, perm=None, loss_sum=0.0)',
     's.update(epoch=s["epoch"] + 1, step=0, loss_sum=0.0)'),
    ("training", "the net never marked trained", "self.net.trained.fill_(True)", "pass"),
    ("training", "a NaN loss not stopped", "if not math.isfinite(loss):", "if False:"),
    ("elbo", "the prior scale ignored",
     "dist.Normal(zero, zero + std)", "dist.Normal(zero, zero + 1.0)"),
    ("elbo", "the plate sized to the batch",
     "pyro.plate(\"data\", size=num_data or len(x_data)", "pyro.plate(\"data\", size=len(x_data)"),
    ("elbo", "the guide's scale exp(rho) instead of softplus(rho)",
     "dist.Normal(self.loc[name], F.softplus(self.rho[name]))", "dist.Normal(self.loc[name], self.rho[name].exp())"),
    ("elbo", "the KL weight left out of the guide",
     "    with poutine.scale(scale=kl_weight):  # as in the model", "    with poutine.scale(scale=1.0):  # as in the model"),
    ("elbo", "the KL weight not passed to SVI", "partial(guide, net=net, kl_weight=kl_weight)", "partial(guide, net=net)"),
    ("elbo", "the ELBO names swapped",
     '{"trace": lambda *settings: Trace_ELBO(), "meanfield": lambda *settings: TraceMeanField_ELBO()}',
     '{"trace": lambda *settings: TraceMeanField_ELBO(), "meanfield": lambda *settings: Trace_ELBO()}'),
    ("elbo", "the scale learning-rate factor applied to the means",
     'lr * (scale_lr_factor if param_name.endswith(tuple(f"rho.{k}" for k in net.rho)) else 1.0)',
     'lr * (scale_lr_factor if param_name.endswith(tuple(f"loc.{k}" for k in net.rho)) else 1.0)'),
    ("elbo", "no learning-rate decay", '"lrd": lr_decay,', '"lrd": 1.0,'),
    ("elbo", "no ReLU", "h = torch.relu(x @ weights", "h = (x @ weights"),
    ("elbo", "guide scales start at softplus(init) mis-inverted",
     "rho0 = inverse_softplus(init_scale)", "rho0 = math.log(init_scale)"),
    ("prediction", "predict uses one sample",
     "return predict_prob(x, net, num_samples, average).argmax(-1)", "return predict_prob(x, net, 1, average).argmax(-1)"),
    ("prediction", "predict_prob uses one sample",
     "logits = sample_logits(x, net, num_samples)  # (S, B, 10)", "logits = sample_logits(x, net, 1)  # (S, B, 10)"),
    ("prediction", "softmax over the samples, not the classes",
     "return logits.softmax(-1).mean(0)\n\n\ndef predict(", "return logits.softmax(0).mean(0)\n\n\ndef predict("),
    ("prediction", "the weight bound ignored",
     "min(num_samples, max_elements // weight_set, max_elements", "min(num_samples, max_elements"),
    ("prediction", "uint8 images not scaled", "return x.reshape(len(x), 784).float() / 255",
     "return x.reshape(len(x), 784).float()"),
    ("prediction", "out-of-range pixels accepted", "if x.min() < 0 or x.max() > 1:", "if x.min() < 0:"),
    ("uncertainty", "mutual information with the sign flipped", '"mutual_information": (pe - ee).clamp_min(0)',
     '"mutual_information": (ee - pe).clamp_min(0)'),
    ("uncertainty", "max_prob inverted", '"max_prob": 1 - mean.max(-1).values', '"max_prob": mean.max(-1).values'),
    ("uncertainty", "expected entropy of the mean", "ee = entropy(probs).mean(0)", "ee = entropy(probs.mean(0))"),
    ("uncertainty", "entropy averaged over classes", "return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)",
     "return -(p * torch.log(p.clamp_min(1e-12))).mean(dim)"),
    ("uncertainty", "refusing below the threshold", 'else u[m] > t for m, t in rule.items()]).any(0)',
     'else u[m] < t for m, t in rule.items()]).any(0)'),
    ("uncertainty", "refusing only where every measure says so", 'else u[m] > t for m, t in rule.items()]).any(0)',
     'else u[m] > t for m, t in rule.items()]).all(0)'),
    ("uncertainty", "the thresholds at the wrong quantile", "return {m: float(torch.quantile(u[m].double(), q)) for m, q in quantiles.items()}",
     "return {m: float(torch.quantile(u[m].double(), 1 - q)) for m, q in quantiles.items()}"),
    ("uncertainty", "the ambiguity half of the rule dropped", 'quantiles["expected_entropy"] = ambiguity_quantile',
     'pass'),
    ("uncertainty", "predict_or_abstain ignores the rule it is given", "rule = rule if rule is not None else net.rule",
     "rule = net.rule or rule"),
    ("metrics", "ties at the threshold refused", 'else u[m] > t for m, t in rule.items()]).any(0)',
     'else u[m] >= t for m, t in rule.items()]).any(0)'),
    ("metrics", "the article's rule refuses a median above 0.2 instead", 'u[m] <= t if m == "max_median_prob"',
     'u[m] > t if m == "max_median_prob"'),
    ("metrics", "the article's median not interpolated", "return (s[(n - 1) // 2] + s[n // 2]) / 2",
     "return s[(n - 1) // 2]"),
    ("prediction", "the article's average: probabilities, not logits", 'return logits.mean(0).softmax(-1)',
     'return logits.softmax(-1).mean(0)'),
    ("metrics", "AUROC off by one", "return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))",
     "return float((ranks[n_in:].sum() - n_out * (n_out - 1) / 2) / (n_in * n_out))"),
    ("metrics", "AUROC ties not averaged", "ranks = (ranks / torch.bincount(inverse, minlength=len(uniq)).double())[inverse]",
     "ranks = ranks[inverse]"),
    ("metrics", "ECE bins off by one", "which = (conf * bins).long().clamp(max=bins - 1)",
     "which = ((conf * bins).long() + 1).clamp(max=bins - 1)"),
    ("metrics", "ECE without the absolute value", "return float((count / count.sum() * (acc - conf).abs()).sum())",
     "return float((count / count.sum() * (acc - conf)).sum())"),
    ("metrics", "Brier averaged over classes", '"brier": ((probs - onehot) ** 2).sum(1).mean().item()',
     '"brier": ((probs - onehot) ** 2).mean(1).mean().item()'),
    ("metrics", "NLL of the predicted class", "p_true = probs.gather(1, y[:, None]).squeeze(1)",
     "p_true = probs.max(1).values"),
    ("metrics", "coverage curve accuracy over all images", "return k / len(score), hits / k",
     "return k / len(score), hits / len(score)"),
    ("checkpoint", "no checkpoint on SIGINT", 'self.save("interrupted")', "pass"),
    ("checkpoint", "the finite check before saving removed",
     'check_finite(self.net, f"{why}; last good checkpoint kept")', "pass"),
    ("checkpoint", "the resume settings check narrowed to two settings",
     'if k != "epochs" and state["settings"].get(k) != v}', 'if k in ("lr", "hidden_size") and state["settings"].get(k) != v}'),
    ("checkpoint", "the RNG state not restored", 'torch.set_rng_state(r["rng"])', "pass"),
    ("checkpoint", "the optimiser state not restored", 'self.optim.set_state(r["optim"])', "pass"),
    ("checkpoint", "the position in the epoch not restored", "self.state.update({k: r[k] for k in self.state})",
     'self.state.update({k: r[k] for k in self.state if k != "step"})'),
    ("checkpoint", "a saved posterior of another shape accepted", "if saved.shape != p.shape:", "if False:"),
    ("checkpoint", "guides loaded with unpickling", "obj = torch.load(path, map_location=device, weights_only=True)",
     "obj = torch.load(path, map_location=device, weights_only=False)"),
    ("checkpoint", "written in place, not beside and renamed", 'tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")',
     "tmp = path"),
    ("checkpoint", "fewer epochs than trained accepted on resume", 'if state["epoch"] > cfg.epochs:', "if False:"),
    ("checkpoint", "a partial file left when a save fails", "os.unlink(tmp)", "pass"),
    ("cli", "every exception swallowed", "except Error as e:  # only the expected failures", "except Exception as e:  #"),
    ("cli", "interrupted runs exit 1", "raise SystemExit(128 + e.signum) from None", "raise SystemExit(1) from None"),
    ("cli", "the threshold range unchecked", "if not lo <= args.threshold <= hi:", "if False:"),
    ("cli", "held-out images trained on", "val, tr = perm[:val_size], perm[val_size:]",
     "val, tr = perm[:val_size], perm"),
    ("cli", "the held-out set depends on the seed", "holdout_split(x, y, cfg.val_size)",
     "holdout_split(x, y, cfg.val_size, cfg.seed)"),
    ("cli", "a given --threshold ignored", "        rule[cfg.measure] = cfg.threshold", "        pass"),
    ("cli", "OOD refusals by the primary measure only", "refused = {name: refuses(scores[name], rule) for name",
     "refused = {name: scores[name][cfg.measure] > rule[cfg.measure] for name"),
    ("cli", "a missing OOD set fatal", 'except Error as e:\n            report["ood_skipped"]',
     'except KeyboardInterrupt as e:\n            report["ood_skipped"]'),
    ("cli", "--num-samples ignored", "probs = predict_prob(x_test, net, cfg.num_samples, cfg.average)",
     "probs = predict_prob(x_test, net, average=cfg.average)"),
    ("cli", "a damaged data file not named", 'return f"{raw / name} is not an MNIST IDX file: damaged or truncated"',
     "continue"),
    ("cli", "the figure shifts the metrics' random numbers",
     'with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):', "with contextlib.nullcontext():"),
    # bugs fixed in the commit "one default objective ..." (9e4bbaf), and the promises pinned after it
    ("uncertainty", "--measure expected_entropy: the ambiguity quantile overwrites --refuse-quantile",
     'if ambiguity_quantile and measure != "expected_entropy":', "if ambiguity_quantile:"),
    ("elbo", "model alone tempered by the training's kl_weight",
     "def model(x_data, y_data=None, num_data=None, *, net, prior_scale=None, kl_weight=1.0):",
     "def model(x_data, y_data=None, num_data=None, *, net, prior_scale=None, kl_weight=DEFAULTS.kl_weight):"),
    ("elbo", "guide alone tempered by the training's kl_weight",
     "def guide(x_data=None, y_data=None, num_data=None, *, net, kl_weight=1.0):",
     "def guide(x_data=None, y_data=None, num_data=None, *, net, kl_weight=DEFAULTS.kl_weight):"),
    ("checkpoint", "load_guide forgets the prior scale",
     'prior_scale=s["prior_scale"]).to(device)', ").to(device)"),
    ("training", "save_guide forgets the net's own rule", "rule = net.rule if rule is None else rule", "rule = rule"),
    ("elbo", "gradient clipping back on (ClippedAdam's clip_norm 10)", '"clip_norm": float("inf"),', ""),
    ("training", "the decay computed from the uncapped number of steps",
     "lr_decay ** (1 / steps), net.prior_scale", "lr_decay ** (1 / math.ceil(len(x_train) / batch_size)), net.prior_scale"),
    ("training", "train drops kl_weight (make_svi's default used)",
     "net.prior_scale, elbo, scale_lr_factor, kl_weight)", "net.prior_scale, elbo, scale_lr_factor)"),
    ("uncertainty", "refusal_rule ignores num_samples", "u = uncertainty(sampler_for(sampler)(x_val, net, num_samples))",
     "u = uncertainty(sampler_for(sampler)(x_val, net))"),
    ("uncertainty", "predict_or_abstain answers with one sample's class",
     "-1, rule_classes(probs, rule))", "-1, probs[0].argmax(-1))"),
    ("cli", "--refuse-quantile ignored by the run",
     "refusal_rule(x_val, net, cfg.measure, cfg.refuse_quantile, cfg.ambiguity_quantile, cfg.unc_samples,",
     "refusal_rule(x_val, net, cfg.measure, DEFAULTS.refuse_quantile, cfg.ambiguity_quantile, cfg.unc_samples,"),
    ("cli", "the noise set drawn from the training seed", "g = torch.Generator().manual_seed(cfg.seed + 1)",
     "g = torch.Generator().manual_seed(cfg.seed)"),
    ("cli", "the article's operating point at the wrong tail",
     'torch.quantile(scores["MNIST"][cfg.measure].double(), 0.875)', 'torch.quantile(scores["MNIST"][cfg.measure].double(), 0.125)'),
    ("cli", "the printed Brier score is the NLL", "Brier {cal['brier']:.4f}", "Brier {cal['nll']:.4f}"),
    ("cli", "--refuse-quantile 1 accepted", "if not 0 < args.refuse_quantile < 1:", "if not 0 < args.refuse_quantile <= 1:"),
    ("cli", "--ambiguity-quantile 0 (off) refused", "if not 0 <= args.ambiguity_quantile < 1:",
     "if not 0 < args.ambiguity_quantile < 1:"),
    ("cli", "--threshold at the top of the range refused", "if not lo <= args.threshold <= hi:",
     "if not lo <= args.threshold < hi:"),
    ("cli", "an infinite rate accepted", "if not value > 0 or (kind is float and not math.isfinite(value)):",
     "if not value > 0:"),
    ("cli", "--val-size 0 with the ambiguity half on accepted",
     'if args.val_size == 0 and args.rule == "quantiles" and (args.threshold is None or args.ambiguity_quantile):',
     'if args.val_size == 0 and args.rule == "quantiles" and args.threshold is None:'),
    ("cli", "a held-out set as big as the training set accepted", "if not 0 <= val_size < len(x):",
     "if not 0 <= val_size <= len(x):"),
    ("cli", "the default ambiguity quantile changed", "ambiguity_quantile: float = 0.965", "ambiguity_quantile: float = 0.95"),
    ("cli", "Ctrl-C outside training exits 1", "raise SystemExit(128 + signal.SIGINT) from None", "raise SystemExit(1) from None"),
    ("report", "selective prediction ranked by one measure whatever the key says",
     'report["selective"] = {m: risk_coverage(scores["MNIST"][m], correct) for m in MEASURES}',
     'report["selective"] = {m: risk_coverage(scores["MNIST"]["max_prob"], correct) for m in MEASURES}'),
    ("report", "the control's pixel table from the test digits instead of the training digits",
     "uncertainty_report(cfg, net, x_test, y_test, rule, device, out, pixel_rarity(x_train))",
     "uncertainty_report(cfg, net, x_test, y_test, rule, device, out, pixel_rarity(x_test))"),
    ("report", "the shift's 0-degree row from the first test digits, not the picked ones",
     'return {a: probs[digits][:, pick] if a == 0 else',
     'return {a: probs[digits][:, : len(pick)] if a == 0 else'),
    # An unseen set: 25 one-line bugs written by a reviewer who read only bnn_mnist.py and the
    # README, after the tests were written (docs/contributing/testing.md reports its score).
    ('unseen data checks', 'label 10 accepted: >= CLASSES flipped to > CLASSES',
     'labels.max() >= CLASSES',
     'labels.max() > CLASSES'),
    ('unseen data loading', '--val-size ignored: holdout_split called without cfg.val_size',
     'holdout_split(x, y, cfg.val_size)',
     'holdout_split(x, y)'),
    ('unseen input checks', 'out-of-range pixels only rejected when both below 0 and above 1 (or -> and)',
     'if x.min() < 0 or x.max() > 1:',
     'if x.min() < 0 and x.max() > 1:'),
    ('unseen guide/ELBO', "guide's log q not weighted by kl_weight (scale 1.0), unlike the model's log p",
     'with poutine.scale(scale=kl_weight):  # as in the model',
     'with poutine.scale(scale=1.0):  # as in the model'),
    ('unseen optimiser', 'the means (loc) get the scale_lr_factor instead of the scales (rho)',
     'f"rho.{k}" for k in net.rho',
     'f"loc.{k}" for k in net.rho'),
    ('unseen lr schedule', 'per-step decay computed with epochs instead of steps per epoch',
     'lr_decay ** (1 / steps)',
     'lr_decay ** (1 / epochs)'),
    ('unseen training loop/resume', 'a resumed mid-epoch run restarts the epoch from step 0',
     'for step in range(state["step"], steps):',
     'for step in range(steps):'),
    ('unseen training loop', 'per-epoch loss sum not reset at the end of an epoch (epoch losses accumulate)',
     'step=0, perm=None, loss_sum=0.0)',
     'step=0, perm=None)'),
    ('unseen checkpoint/load', 'load_guide takes a guide of the retired fan-in prior for a normal one',
     'if s.get("prior", "normal") != "normal":', 'if False:'),
    ('unseen saving', 'run saves guide.pt without the refusal rule (rule argument dropped)',
     'save_guide(out / "guide.pt", net, cfg.prior_scale, rule)',
     'save_guide(out / "guide.pt", net, cfg.prior_scale)'),
    ('unseen prediction', "Predictive path averages logits before softmax (the article's bug)",
     '["_RETURN"]  # (S, B, 10)\n    return logits.softmax(-1).mean(0)',
     '["_RETURN"]  # (S, B, 10)\n    return logits.mean(0).softmax(-1)'),
    ('unseen refusal rule', 'ambiguity half added even when ambiguity_quantile is 0 / overrides expected_entropy (and -> or)',
     'if ambiguity_quantile and measure != "expected_entropy":',
     'if ambiguity_quantile or measure != "expected_entropy":'),
    ('unseen refusal rule', 'threshold taken at the wrong tail of the quantile (1 - q)',
     'float(torch.quantile(u[m].double(), q))',
     'float(torch.quantile(u[m].double(), 1 - q))'),
    ('unseen refusal rule', 'refuse only when every measure exceeds its threshold (any -> all)',
     'for m, t in rule.items()]).any(0)',
     'for m, t in rule.items()]).all(0)'),
    ('unseen metrics/AUROC', 'Mann-Whitney offset off by one: n_out*(n_out-1)/2',
     'n_out * (n_out + 1) / 2',
     'n_out * (n_out - 1) / 2'),
    ('unseen metrics/NLL', "NLL computed from the predicted class's probability, not the true class's",
     '"nll": -torch.log(p_true.clamp_min(1e-12)).mean().item(),',
     '"nll": -torch.log(probs.max(1).values.clamp_min(1e-12)).mean().item(),'),
    ('unseen metrics/risk-coverage', 'accuracy-coverage curve accepts the least certain first (descending sort)',
     'order = torch.argsort(score, stable=True)',
     'order = torch.argsort(score, stable=True, descending=True)'),
    ('unseen rotation shift', 'multiples of 90 taken mod 2: 180 degrees is no rotation, 270 is 90',
     'int(degrees // 90) % 4',
     'int(degrees // 90) % 2'),
    ('unseen near-OOD overlay', 'overlay pairs digits of the same class instead of different classes',
     'keep = (y[a] != y[b])',
     'keep = (y[a] == y[b])'),
    ('unseen pixel-rarity control', 'every pixel counted as inked (>= 0 instead of > 0)',
     'return (x_train > 0).float().mean(0)',
     'return (x_train >= 0).float().mean(0)'),
    ('unseen shift report', 'rotated digits scored against the first n test labels instead of the picked ones',
     'report["shift"] = shift_report(by_angle(probs, pick), y_test[pick])',
     'report["shift"] = shift_report(by_angle(probs, pick), y_test[: len(pick)])'),
    ('unseen CLI report', 'article operating point at the wrong tail: refuses 87.5% instead of 12.5%',
     'scores["MNIST"][cfg.measure].double(), 0.875))',
     'scores["MNIST"][cfg.measure].double(), 0.125))'),
    ('unseen argument validation', "--ambiguity-quantile 0 (documented 'off') rejected: 0 <= became 0 <",
     'if not 0 <= args.ambiguity_quantile < 1:',
     'if not 0 < args.ambiguity_quantile < 1:'),
    ('unseen CLI settings', '--refuse-quantile ignored: run reads DEFAULTS.refuse_quantile instead of cfg',
     'cfg.measure, cfg.refuse_quantile, cfg.ambiguity_quantile',
     'cfg.measure, DEFAULTS.refuse_quantile, cfg.ambiguity_quantile'),
    # the article beside the default, and the per-image sampler (2026-12-05)
    ("elbo", "--article: the batch NLL scaled to the data set after all", "None if kl_per_batch else num_data",
     "num_data"),
    ("training", "the article's init ignored", 'if init == "article":  # the article', 'if False:  # the article'),
    ("cli", "--article's settings not applied", "            setattr(args, name, value)", "            pass"),
    ("cli", "an explicit --kl-weight beside --article still counts the KL per batch",
     "        args.kl_per_batch = False", "        pass"),
    ("prediction", "local sampler: x instead of x^2 in the variance", "std = (x.square() @ scale", "std = (x @ scale"),
    ("prediction", "local sampler: the variance used as the std",
     'scale["fc1_bias"].square()).sqrt_()  # (B, H)', 'scale["fc1_bias"].square())  # (B, H)'),
    ("prediction", "local sampler: every image the same noise",
     "offset = torch.randint(len(pool) - S + 1, (B,), device=x.device, generator=generator)",
     "offset = torch.zeros(B, dtype=torch.long, device=x.device)"),
    ("prediction", "local sampler: no output-layer noise", 'out_w = net.loc["out_weight"] + scale["out_weight"] *',
     'out_w = net.loc["out_weight"] + 0 * scale["out_weight"] *'),
    ("images", "a light background not inverted", "if background - gray.min() > gray.max() - background:", "if False:"),
    ("images", "not centred by mass", "top = int(np.clip(round(side / 2 - cy), 0, side - h))", "top = 0"),
    ("images", "the aspect ratio not kept", "shape = (max(1, round(w * scale)), max(1, round(h * scale)))",
     "shape = (size, size)"),
    ("page", "oversized bodies read", "if length < 0 or length > MAX_BODY:", "if length < 0:"),
    ("metrics", "the article's rule answers with the mean's class, not the highest median",
     'return (median_probs(probs) if "max_median_prob" in rule else probs.mean(0)).argmax(-1)',
     "return probs.mean(0).argmax(-1)"),
    ("page", "any path serves the page", 'if self.path.split("?")[0] not in ("/", "/index.html"):', "if False:"),
    # after the unseen set
    ("report", "the 135-degree set not scored",
     'if a != 0 and f"rotated {a}" not in near}', 'if a not in (0, 135) and f"rotated {a}" not in near}'),
    ("report", "the shift's 0-degree row from the rotated-15 set",
     'return {a: probs[digits][:, pick] if a == 0 else probs[f"rotated {a}"] for a in SHIFT_ANGLES}',
     'return {a: probs["rotated 15"] if a == 0 else probs[f"rotated {a}"] for a in SHIFT_ANGLES}'),
    # --elbo local (local reparameterization)
    ("elbo", "local: one noise draw shared by every image of the minibatch",
     "return mean + var.sqrt() * torch.randn_like(mean)", "return mean + var.sqrt() * torch.randn_like(mean[:1])"),
    ("elbo", "local: the variance from h, not h squared",
     'var = h.square() @ scale[f"{name}_weight"].square().mT', 'var = h @ scale[f"{name}_weight"].square().mT'),
    ("elbo", "local: the variance used as the std", "return mean + var.sqrt() * torch.randn_like(mean)",
     "return mean + var * torch.randn_like(mean)"),
    ("elbo", "local: the KL not weighted", "return nll + kl_weight * kl", "return nll + kl"),
    ("elbo", "local: the minibatch not scaled to the data set",
     "reduction=\"sum\") * (num_data or len(x_data)) / len(x_data)", "reduction=\"sum\")"),
    ("elbo", "local: the KL to N(0, 1) whatever the model's prior",
     "dist.Normal(loc.new_zeros(()), std)", "dist.Normal(loc.new_zeros(()), 1.0)"),
]


def run_one(i, timeout):
    area, what, old, new = MUTANTS[i]
    source = (ROOT / "bnn_mnist.py").read_text()
    if source.count(old) != 1:
        return "stale", 0.0  # the code changed: fix the mutant's text
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        for name in ("tests", "benchmarks", "docs", "pytest.ini", "README.md"):
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, Path(tmp) / name)
        (Path(tmp) / "bnn_mnist.py").write_text(source.replace(old, new))
        t0 = time.time()
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                *[f"tests/{f}" for f in ORDER]], cwd=tmp, capture_output=True, text=True,
                               timeout=timeout)
            status = "survived" if r.returncode == 0 else "killed"
        except subprocess.TimeoutExpired:
            status = "killed (timeout)"
        return status, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", type=int, nargs="*", help="mutant numbers (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=int, default=900, help="seconds per mutant before it counts as killed")
    args = p.parse_args(argv)
    if args.list:
        for i, (area, what, _, _) in enumerate(MUTANTS):
            print(f"{i:3} {area:12} {what}")
        return
    results = {}
    for i in args.only if args.only is not None else range(len(MUTANTS)):
        status, seconds = run_one(i, args.timeout)
        results[i] = status
        print(f"{i:3} {MUTANTS[i][0]:12} {status:17} {seconds:6.0f} s  {MUTANTS[i][1]}", flush=True)
    killed = sum(s.startswith("killed") for s in results.values())
    print(f"killed {killed} of {len(results)} mutants ({killed / max(len(results), 1):.0%}); "
          f"survived: {[i for i, s in results.items() if s == 'survived']}; "
          f"stale: {[i for i, s in results.items() if s == 'stale']}")


if __name__ == "__main__":
    main()
