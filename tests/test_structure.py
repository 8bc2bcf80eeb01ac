"""The module reads as the article: Part I (the article's steps) and Part II ("I don't know")
read top to bottom, each name they use defined above it or reached through the one hook into
the plumbing (`Plumbing`); every function fits on a screen; the article's model and guide come
early."""

import ast

from conftest import ROOT

SOURCE = (ROOT / "bnn_mnist.py").read_text()
LINES = SOURCE.splitlines()
TREE = ast.parse(SOURCE)
HOOK = "Plumbing"


def part_line(title):
    """The line number (1-based) of a part's header comment, e.g. '# Part III.'."""
    return next(i for i, line in enumerate(LINES, 1) if line.startswith(f"# Part {title}."))


def module_names(tree):
    """{name: line} of every module-level function, class and assigned name."""
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node.lineno
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        names.setdefault(n.id, node.lineno)
    return names


def local_names(node):
    """Parameters and assigned names of a function (and of the functions inside it)."""
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
    return names


def forward_references(tree, start, end):
    """(user, name): module-level names used by the code on lines [start, end) that are
    defined further down (the hook aside)."""
    defined, found = module_names(tree), []
    for node in tree.body:
        if not start <= node.lineno < end:
            continue
        scopes = [n for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.Lambda))]
        local = set().union(*(local_names(f) for f in scopes)) if scopes else set()
        defaults = {id(d) for f in scopes for d in [*f.args.defaults, *f.args.kw_defaults] if d is not None}
        for n in ast.walk(node):
            if (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id != HOOK
                    and defined.get(n.id, 0) > node.lineno and (n.id not in local or id(n) in defaults)):
                found.append((getattr(node, "name", "?"), n.id))
    return found


def test_parts_one_and_two_use_nothing_defined_below_them_but_the_hook():
    assert forward_references(TREE, part_line("I"), part_line("III")) == []
    # the check sees a forward reference, in a function body, a method or a default, and lets the hook pass
    toy = ast.parse("def a(x=C):\n    return b(x) + Plumbing.c()\n\nclass K:\n    def f(self):\n        return b()\n\n"
                    "def b():\n    return a()\n\nC = 1\n")
    assert forward_references(toy, 1, 99) == [("a", "C"), ("a", "b"), ("K", "b")]


def test_the_hook_leads_only_into_the_plumbing():
    hook = next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == HOOK)
    assert part_line("V") < hook.lineno < part_line("VI")
    used = {n.attr for n in ast.walk(ast.parse("\n".join(LINES[part_line("I") - 1 : part_line("III") - 1])))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == HOOK}
    offered = {t.id for n in hook.body if isinstance(n, ast.Assign) for t in n.targets}
    assert used == offered  # nothing offered that the article does not use, nothing used that is not offered


def test_no_function_is_longer_than_a_screen():
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(TREE)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []


def test_the_article_comes_first_and_reads_in_one_sitting():
    defs = {n.name: n.lineno for n in TREE.body if isinstance(n, ast.FunctionDef)}
    assert defs["model"] < defs["guide"] < 250
    assert part_line("III") - part_line("I") <= 650
    order = ["load_mnist", "BNN", "model", "guide", "make_svi", "train_epoch", "train", "sample_logits",
             "predict_prob", "predict", "plot", "uncertainty", "refusal_rule", "predict_or_abstain"]
    lines = [module_names(TREE)[name] for name in order]
    assert lines == sorted(lines) and lines[-1] < part_line("III")
