"""The shape of the code, read from its syntax trees: imports run down the layers, functions stay short.

The layers, lowest first: kernels < model < decoding < parallel < train < verification < benchmarks.
A module may import from its own folder and the folders below it, never from one above (the model
never knows how it is decoded, parallelised or trained, and no runtime module reaches the proofs or
the benchmarks). A function longer than MAX_FUNCTION_LINES is split where a name helps; Triton
kernels (`@triton.jit`) are exempt, since a kernel is one unit of compiled code.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "model", "decoding", "parallel", "train", "verification", "benchmarks")
MAX_FUNCTION_LINES = 60

# Known exceptions, each with why it stands; the tests fail on new ones, not on these.
UPWARD_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {}
LONG_FUNCTIONS_ALLOWED: dict[tuple[str, str], str] = {}


def modules() -> list[tuple[str, ast.Module]]:
    """(path relative to the repository, syntax tree) of every module of the four layers."""
    return [
        (path.relative_to(REPO).as_posix(), ast.parse(path.read_text(), filename=str(path)))
        for layer in LAYERS
        for path in sorted((REPO / layer).rglob("*.py"))
    ]


def imported_layers(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, layer) of every absolute import of one of the layers, at any depth (lazy imports count)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in LAYERS]
    return found


def is_triton_kernel(function: ast.FunctionDef) -> bool:
    decorators = [d.func if isinstance(d, ast.Call) else d for d in function.decorator_list]
    return any(ast.unparse(d) == "triton.jit" for d in decorators)


def long_functions(tree: ast.Module) -> list[tuple[str, int, int]]:
    """(name, first line, length in lines) of every function or method over MAX_FUNCTION_LINES, decorators excluded."""
    return [
        (node.name, node.lineno, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
        and not is_triton_kernel(node)
    ]


def test_imports_never_reach_a_higher_layer() -> None:
    upward = [
        f"{path}:{line} imports {layer} (a higher layer than {path.split('/')[0]})"
        for path, tree in modules()
        for line, layer in imported_layers(tree)
        if LAYERS.index(layer) > LAYERS.index(path.split("/")[0]) and (path, layer) not in UPWARD_IMPORTS_ALLOWED
    ]
    assert not upward, "\n".join(upward)


def test_functions_fit_in_sixty_lines() -> None:
    too_long = [
        f"{path}:{line} {name} has {length} lines (at most {MAX_FUNCTION_LINES}; split it where a name helps)"
        for path, tree in modules()
        for name, line, length in long_functions(tree)
        if (path, name) not in LONG_FUNCTIONS_ALLOWED
    ]
    assert not too_long, "\n".join(too_long)
