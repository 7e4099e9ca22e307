"""The package's import graph: no cycles (lazy, function-local imports counted too), so the layers
read bottom up: config, io -> checkpoint -> model -> engine, training, serving."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "nanoseek"


def import_graph() -> dict[str, set[str]]:
    mods = {p: ".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
            for p in ROOT.rglob("*.py")}
    names, edges = set(mods.values()), {m: set() for m in mods.values()}
    for p, m in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    t = f"{target}.{a.name}" if f"{target}.{a.name}" in names else target
                    if t in names and t != m:
                        edges[m].add(t)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in names and a.name != m:
                        edges[m].add(a.name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles in nanoseek/ (a package in one of them cannot be read bottom up): {found}"


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_entry_point_imports_the_cli():
    """The command line sits on top of the library: only `python -m nanoseek` (__main__) imports
    nanoseek.cli, so no library module depends on argument parsing or printing."""
    def in_cli(m: str) -> bool:
        return m == "nanoseek.cli" or m.startswith("nanoseek.cli.")

    users = sorted(m for m, targets in import_graph().items() if not in_cli(m) and any(map(in_cli, targets)))
    assert users == ["nanoseek.__main__"], f"modules outside nanoseek/cli/ that import it: {users}"


def test_only_the_layers_above_inference_import_it():
    """The models, their sampling and speculative decoding, the tokenizers, checkpoints, quant/,
    parallel/ and train/ sit below nanoseek.infer: only the packages built on the engine import it."""
    def in_infer(m: str) -> bool:
        return m == "nanoseek.infer" or m.startswith("nanoseek.infer.")

    above = {"cli", "evaluation", "finetune", "recipes", "rl", "serve", "tasks"}
    users = sorted(m for m, targets in import_graph().items()
                   if not in_infer(m) and any(map(in_infer, targets)) and m.partition(".")[2].split(".")[0] not in above)
    assert not users, f"modules below nanoseek/infer/ that import it: {users}"


def test_quant_sits_below_the_checkpoint():
    """quant/ (FP8 blocks, kernels, GGML blocks, quantized layers) builds on the model alone;
    checkpoint.py reads and writes FP8 blocks through it, never the other way round."""
    def in_quant(m: str) -> bool:
        return m.startswith("nanoseek.quant")

    below = {"nanoseek.config", "nanoseek.io", "nanoseek.model"}
    found = sorted(f"{m} -> {t}" for m, targets in import_graph().items() if in_quant(m)
                   for t in targets if not in_quant(t) and t not in below)
    assert not found, f"quant/ imports from above the model: {found}"
