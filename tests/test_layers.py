"""The package's layers (shared DESIGN.md, adapter/lalm/__init__.py): every import, those inside
functions included, points down or sideways within a layer, and no modules import each other in a
circle. Read from the source with ast, so it holds for code no test runs."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# moe_kernels, bottom to top. A module may import its own layer or lower ones.
KERNEL_LAYERS = {
    "platform": 0,
    "reference": 0,
    "epilogues": 1,
    "gemm_config": 1,
    "routing": 1,
    "permutation": 1,
    "persistent_gemm": 1,
    "wgrad": 1,
    "grouped_gemm": 1,
    "functions": 2,
    "grouped_mm_experts": 2,
    "auto": 3,
    "backend": 3,
    "custom_ops": 3,
    "ops": 3,
    "__init__": 4,
}
# adapter/lalm, bottom to top (studies and training are packages: every module in them).
LALM_LAYERS = {
    **dict.fromkeys(
        ["config", "audio", "ct2", "encoder", "semantic", "tokenizer", "model", "assemble", "data", "corpus"], 0
    ),
    "training": 1,
    **dict.fromkeys(["evaluate", "transcribe", "plots", "train"], 2),
    "studies": 3,
    "demo": 4,
    "__init__": 4,
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in ("moe_kernels", "adapter"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (resolved to modules, not names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    # "from pkg import sub" also names pkg itself: drop a package's own __init__ as an edge from
    # inside it (importing a sibling module loads the package first by Python's rules, not ours).
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}


def _kernel_layer(module: str) -> int | None:
    if module == "moe_kernels":
        return KERNEL_LAYERS["__init__"]
    return KERNEL_LAYERS[module.split(".")[1]] if module.startswith("moe_kernels.") else None


def _lalm_layer(module: str) -> int | None:
    if module == "adapter.lalm":
        return LALM_LAYERS["__init__"]
    return LALM_LAYERS[module.split(".")[2]] if module.startswith("adapter.lalm.") else None


def test_every_module_has_a_layer():
    for m in _modules():
        if m.startswith("moe_kernels"):
            assert m == "moe_kernels" or m.split(".")[1] in KERNEL_LAYERS, f"{m}: add it to KERNEL_LAYERS"
        if m.startswith("adapter.lalm."):
            assert m.split(".")[2] in LALM_LAYERS, f"{m}: add it to LALM_LAYERS"


def test_imports_point_down():
    upward = []
    for m, targets in _graph().items():
        for t in targets:
            if m.startswith("moe_kernels") and t.startswith("adapter"):
                upward.append(f"{m} -> {t} (kernels know nothing of modules)")
            if m.startswith("adapter") and not m.startswith("adapter.lalm") and t.startswith("adapter.lalm"):
                upward.append(f"{m} -> {t} (the adapters know nothing of the reference LALM)")
            for layer in (_kernel_layer, _lalm_layer):
                a, b = layer(m), layer(t)
                if a is not None and b is not None and b > a:
                    upward.append(f"{m} (layer {a}) -> {t} (layer {b})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    graph, circles = _graph(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                circles.append(" -> ".join(path[path.index(t) :] + [m, t]) if t in path else f"{m} -> {t}")
            elif t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    """The rule reads imports inside functions too: the 9-module circle this replaced was made of them."""
    src = tmp_path / "routing.py"
    src.write_text("def f():\n    from moe_kernels.backend import resolve_backend\n")
    found = _imports("moe_kernels.routing", src, {"moe_kernels.backend", "moe_kernels.routing"})
    assert found == {"moe_kernels.backend"} and _kernel_layer("moe_kernels.backend") > _kernel_layer(
        "moe_kernels.routing"
    )
