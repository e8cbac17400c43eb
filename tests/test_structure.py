"""The package's shape (docs/design.md): no import cycle among sparseops' modules, no oversized
Python file, and every op's files found from its name."""
import ast
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "sparseops"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """sparseops modules that `path` imports, at any depth of the file (function-level imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sparseops")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("sparseops"):
                continue
            for a in node.names:  # `from . import x` imports the submodule x when there is one
                sub = f"{base}.{a.name}"
                out.add(sub if (PKG.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                        or (PKG.parent / Path(*sub.split(".")) / "__init__.py").exists() else base)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for dep in _imports(path, name):
            while dep not in modules and "." in dep:
                dep = dep.rpartition(".")[0]
            if dep in modules and dep != name:
                deps.add(dep)
        graph[name] = deps
    return graph


def test_no_import_cycle_in_sparseops():
    graph = _graph()
    # Importing a submodule imports its parent packages first: those edges are implied, not cycles.
    def parents(m):
        parts = m.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if d in parents(m):
                continue
            if state.get(d) == "open":
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_cycle_check_sees_cycles(tmp_path, monkeypatch):
    """The check itself: a graph with a cycle is reported (a check that cannot fail proves nothing)."""
    fake = {"sparseops": set(), "sparseops.a": {"sparseops.b"}, "sparseops.b": {"sparseops.a"}}
    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: fake)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle_in_sparseops()


def test_the_layers_and_cli_never_choose_an_implementation():
    """Only sparseops.backend decides (its choose/require); layers and tools ask it or the ops."""
    for name in ("nn.py", "patch.py", "cli.py", "demo.py"):
        text = (PKG / name).read_text()
        for word in ("choose(", "require(", "has_kernel(", "max_density(", "get_backend(", "backend._state"):
            if name in ("cli.py", "demo.py") and word in ("max_density(", "get_backend("):
                continue  # they report the policy, read through the backend's public functions
            assert word not in text, (name, word)


def test_no_python_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


OPS = ("soft_mask", "masked_linear", "masked_conv2d", "soft_masked_linear", "soft_masked_conv2d",
       "channel_masked_linear", "channel_masked_conv2d")
# Dense products of the kept channels (torch's own GEMM / convolution on every device): no Triton kernel.
DENSE_OPS = ("channel_masked_linear", "channel_masked_conv2d")


@pytest.mark.parametrize("op", OPS)
def test_each_op_is_found_from_its_name(op):
    schema = (ROOT / "csrc" / "ops.cpp").read_text()
    assert f'm.def("{op}(' in schema
    assert hasattr(__import__("sparseops").reference, op)
    assert (PKG / "ops" / f"{op}.py").exists()
    assert (PKG / "triton" / f"{op}.py").exists() or op in DENSE_OPS
    assert (ROOT / "tests" / f"test_{op}.py").exists()
    bench = ROOT / "benchmarks" / f"bench_{op}.py"
    assert bench.exists() or any(op in (ROOT / "benchmarks" / name).read_text()
                                 for name in ("bench_gpu.py", "bench_structured.py"))
    design = (ROOT / "docs" / "design.md").read_text()
    assert f"`{op}`" in design
    assert torch.ops.sparseops.__getattr__(op) is not None


def test_nothing_refers_outside_the_repository():
    outside = ".." + "/shared"  # (spelled so that this file does not match itself)
    for path in [*PKG.rglob("*.py"), *(ROOT / "csrc").rglob("*.*"), *(ROOT / "docs").rglob("*.md"),
                 ROOT / "README.md", *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        assert outside not in path.read_text(errors="replace"), path
