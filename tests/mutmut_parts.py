"""Mutation testing by a tool, by part: mutmut 3 (configured in setup.cfg) over bnn_mnist.py.

    python tests/mutmut_parts.py run article            # Parts I and II: the article and "I don't know"
    python tests/mutmut_parts.py run rest --first 400   # Parts III-VII, the next 400 (hours in all on 2 cores)
    python tests/mutmut_parts.py rerun all --first 450  # survivors not set aside (after new tests), then the next
    python tests/mutmut_parts.py score                  # each part's score, what is set aside apart
    python tests/mutmut_parts.py survivors rest         # each survivor's diff (mutmut show), not set aside
    python tests/mutmut_parts.py set-aside              # each survivor kept out of the score, and why

A part is the functions whose definitions lie between its "# Part N." headers ("all": both). `run`
names to mutmut the part's unchecked mutants in one fixed random order (seed 0, kept in
mutants/order.json: a function changed later has its new mutants put in at random places, the rest
keep their order), so the longest run of that order checked whole is a uniform random sample of the
part: `score` gives its score with a 95% interval, and the next `run` goes on where the last stopped
(first the changed function's mutants in that run; with none left unchecked and bnn_mnist.py changed,
`run` first lets mutmut make the new mutants, in a run of one mutant already killed, then names them).
mutmut keeps its results in mutants/ (git-ignored). Set aside from the score: the equivalent mutants
listed, each with its reason, in docs/contributing/mutation/equivalent.txt ("mutant name: reason"), and
survivors that change only help text or a figure's words and styling (READER_TEXT, FIGURE_STYLE below).
"""

import argparse
import ast
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "docs" / "contributing" / "mutation" / "equivalent.txt"
PARTS = {"article": ("I", "III"), "rest": ("III", None)}


def functions_by_part():
    """{part: [mutmut name prefixes]} of the module's functions and methods, by where they are defined."""
    source = (ROOT / "bnn_mnist.py").read_text()
    lines = source.splitlines()
    header = {title: next(i for i, line in enumerate(lines, 1) if line.startswith(f"# Part {title}."))
              for title in ("I", "III")}
    parts = {name: [] for name in PARTS}
    for node in ast.parse(source).body:
        names = []
        if isinstance(node, ast.FunctionDef):
            names = [f"x_{node.name}"]
        elif isinstance(node, ast.ClassDef):
            names = [f"x\u01c1{node.name}\u01c1{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)]
        part = "article" if header["I"] < node.lineno < header["III"] else "rest" if node.lineno > header["III"] else None
        if part:
            parts[part] += [f"bnn_mnist.{n}__mutmut_" for n in names]
    return parts


def equivalents():
    if not EQUIVALENT.exists():
        return {}
    pairs = (line.split(":", 1) for line in EQUIVALENT.read_text().splitlines() if line.strip() and line[0] != "#")
    return {name.strip(): reason.strip() for name, reason in pairs}


def results():
    """{mutant name: status} from mutmut's record in mutants/ (mutmut's own names for exit codes)."""
    from mutmut.stats import status_by_exit_code  # reads setup.cfg from the working folder: ROOT

    for attempt in range(10):  # mutmut rewrites the file while it runs: read it whole
        try:
            meta = json.loads((ROOT / "mutants" / "bnn_mnist.py.meta").read_text())
            break
        except json.JSONDecodeError:
            if attempt == 9:
                raise
            time.sleep(0.5)
    return {k: status_by_exit_code[v] for k, v in meta["exit_code_by_key"].items()}


def part_of(name, parts):
    return next((p for p, prefixes in parts.items() if any(name.startswith(x) for x in prefixes)), None)


# Not behaviour, told apart from the original function by comparing syntax trees with these left out:
# words for a reader in argparse (help=, description=, epilog=, a group's title: setup.cfg leaves out help=
# lines, but these also sit on lines with a flag's type and default), and a figure's words and styling, in calls on
# matplotlib objects (ax.bar(..., color=...), fig.suptitle(...)) and in _figure (its size and ratios).
# A style chosen by the data (color="red" if refused else "green") is meaning, and stays compared.
READER_TEXT = ("help", "description", "epilog")
FIGURE_STYLE = ("label", "title", "xlabel", "ylabel", "fontsize", "labelsize", "color", "alpha", "ms", "markersize",
                "lw", "linewidth", "zorder", "shrink", "widths", "figsize", "height_ratios", "width_ratios")
FIGURE_WORDS = ("suptitle", "set_title", "set_xlabel", "set_ylabel", "text", "legend")


def function_source(source, name):
    """The text of `def name(` in source, dedented (mutmut's copies of a function, by name)."""
    lines = source[source.rindex("\n", 0, source.index(f"def {name}(")) + 1:].splitlines()
    indent = len(lines[0]) - len(lines[0].lstrip())
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() and len(line) - len(line.lstrip()) <= indent
                and not line.lstrip().startswith((")", "]", "}"))), len(lines))
    return "\n".join(line[indent:] for line in lines[:end])


def _without(tree, kind):
    """tree with the calls' parts of `kind` ("help text" or "figure style") taken out."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if kind == "help text":
            node.keywords = [k for k in node.keywords if k.arg not in READER_TEXT]
            if getattr(node.func, "attr", None) == "add_argument_group":  # its title, a heading in --help
                node.args = []
        elif isinstance(node.func, ast.Attribute) or getattr(node.func, "id", None) == "_figure":
            node.keywords = [k for k in node.keywords if k.arg not in FIGURE_STYLE or isinstance(k.value, ast.IfExp)]
            if getattr(node.func, "attr", None) in FIGURE_WORDS:
                node.args, node.keywords = [], []
    tree.name = "f"  # mutmut's copies differ in name: compare the signature (its defaults) and the body
    return ast.dump(tree)


def not_behaviour(name, source):
    """Why mutant `name` is not behaviour ("help text", "figure style"), or None when it may be."""
    mutant = name.split(".", 1)[1]
    original = mutant.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"
    if f"def {mutant}(" not in source:  # mutmut is writing the file anew: ask again later
        return None
    for kind in ("help text", "figure style"):
        trees = [ast.parse(function_source(source, f)).body[0] for f in (mutant, original)]
        if _without(trees[0], kind) == _without(trees[1], kind):
            return kind
    return None


def set_aside(done):
    """{mutant: reason} of the survivors that are not bugs: the listed equivalents, help text, figure style."""
    same = equivalents()
    source = (ROOT / "mutants" / "bnn_mnist.py").read_text()
    for name, status in done.items():
        if status == "survived" and name not in same and (why := not_behaviour(name, source)):
            same[name] = why
    return same


def wilson(k, n, z=1.96):
    """The 95% interval of a proportion k/n (Wilson's): a sample's score, not the part's."""
    if n == 0:
        return float("nan"), float("nan")
    centre, half = (k + z * z / 2) / (n + z * z), z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return centre - half, centre + half


def tally(statuses):
    """(killed, counted) of mutant statuses: set-aside ones and the unchecked are not counted."""
    counted = [s for s in statuses if s in ("killed", "survived", "timeout", "no tests", "segfault")]
    return sum(s in ("killed", "timeout", "segfault") for s in counted), len(counted)


def score():
    parts, done = functions_by_part(), results()
    same = set_aside(done)
    table = {}
    for part in PARTS:
        names = [n for n in done if part_of(n, parts) == part]
        status = [(same[n] if same.get(n) in ("help text", "figure style") else "equivalent" if n in same else done[n])
                  for n in names]
        killed, counted = tally(status)
        table[part] = {s: status.count(s) for s in sorted(set(status))}
        table[part]["score"] = killed / counted if counted else float("nan")
        print(f"{part}: {killed} of {counted} non-equivalent mutants killed ({table[part]['score']:.1%}); "
              + ", ".join(f"{s} {c}" for s, c in table[part].items() if s != "score"))
        if "not checked" in table[part]:  # the longest run of the fixed random order checked whole: a fair sample
            order = todo(part, parts, done, lambda n, s: True)
            sample = order[:next(i for i, n in enumerate(order) if done[n] == "not checked")]
            k, n = tally([("equivalent" if name in same else done[name]) for name in sample])
            low, high = wilson(k, n)
            print(f"  a uniform random sample of {part}, its first {len(sample)} mutants in the fixed order: "
                  f"{k} of {n} non-equivalent killed ({k / max(1, n):.1%}); "
                  f"the part's score lies in {low:.1%} to {high:.1%} (95%, Wilson)")
    return table


def todo(part, parts, done, wanted):
    """The part's mutants whose status (in done) is wanted, in its fixed random order (any prefix: a fair sample)."""
    return [n for n in fixed_order(part, [n for n in done if part_of(n, parts) == part]) if wanted(n, done[n])]


def fixed_order(part, names):
    """The part's mutants in one random order, kept in mutants/order.json from the first call (seed 0).

    A function changed since gets its mutants afresh from mutmut (unchecked): names new to the order go
    in at random places, so the order of every other mutant, and the sample it gives, stays."""
    path = ROOT / "mutants" / "order.json"
    orders = json.loads(path.read_text()) if path.exists() else {}
    if part in orders:
        order = orders[part]
    else:
        order = sorted(names)
        random.Random(0).shuffle(order)
    known, present, rng = set(order), set(names), random.Random(len(order))
    for name in sorted(present - known):
        order.insert(rng.randrange(len(order) + 1), name)
    order = [n for n in order if n in present]
    if orders.get(part) != order:
        path.write_text(json.dumps({**orders, part: order}))
    return order


def forget_stale_test_reach():
    """mutmut times (and maps to the functions they reach) only tests it has not seen: a test changed
    since keeps its old map and is never picked for a function it now reaches. When a test file is newer
    than mutmut's record, remove the record: the run times every test again (minutes, not hours)."""
    stats = ROOT / "mutants" / "mutmut-stats.json"
    tests = [*(ROOT / "tests").glob("test_*.py"), ROOT / "tests" / "conftest.py"]  # not this tool's own file
    if stats.exists() and any(f.stat().st_mtime > stats.stat().st_mtime for f in tests):
        stats.unlink()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("run", "rerun", "score", "survivors", "set-aside"))
    p.add_argument("part", nargs="?", choices=(*PARTS, "all"), default="article")
    p.add_argument("--first", type=int, default=None, help="run only this many (the next in the fixed order)")
    p.add_argument("--max-children", type=int, default=2)
    args = p.parse_args(argv)
    os.chdir(ROOT)
    if args.command == "score":
        score()
        return 0
    if args.command == "set-aside":  # each survivor kept out of the score, with its reason
        done = results()
        for name, why in sorted(set_aside(done).items()):
            if done.get(name) == "survived":
                print(f"{name}: {why}")
        return 0
    parts, chosen = functions_by_part(), (list(PARTS) if args.part == "all" else [args.part])
    if not (ROOT / "mutants" / "bnn_mnist.py.meta").exists():  # a first run: mutmut makes its record
        if args.command == "survivors":
            return 0
        globs = [f"{prefix}*" for part in chosen for prefix in parts[part]]
    else:
        done = results()
        same = set_aside(done)
        survivors = [n for part in chosen for n in todo(part, parts, done, lambda n, s: s in ("survived", "no tests")
                                                         and n not in same)]
        if args.command == "survivors":
            for name in survivors:
                subprocess.run(["mutmut", "show", name], cwd=ROOT)
            return 0
        # mutmut reruns every mutant it is named: name only these. rerun: first the survivors a test
        # written since may kill, then (as run) the unchecked
        unchecked = [n for part in chosen for n in todo(part, parts, done, lambda n, s: s == "not checked")]
        globs = ((survivors if args.command == "rerun" else []) + unchecked)[:args.first]
        forget_stale_test_reach()
    # one thread per process from the start: workers are forked, and a forked OpenMP pool deadlocks
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    mutmut = ["mutmut", "run", "--max-children", str(args.max_children)]
    if not globs and stale_record():
        # bnn_mnist.py changed since mutmut's copy, and mutmut makes a changed function's mutants afresh only
        # inside a run: one mutant already killed refreshes the record, then its new mutants are named
        subprocess.run([*mutmut, next(n for n, s in done.items() if s == "killed")], cwd=ROOT, env=env)
        if stale_record():
            sys.exit("mutmut did not make bnn_mnist.py's mutants afresh: see its output above")
        return main(argv)
    if not globs:
        score()
        return 0
    return subprocess.run([*mutmut, *globs], cwd=ROOT, env=env).returncode


def stale_record():
    """Whether bnn_mnist.py is newer than mutmut's mutated copy of it (a function may have changed)."""
    copy = ROOT / "mutants" / "bnn_mnist.py"
    return copy.exists() and (ROOT / "bnn_mnist.py").stat().st_mtime > copy.stat().st_mtime


if __name__ == "__main__":
    sys.exit(main())
