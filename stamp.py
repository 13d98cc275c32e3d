"""What a cached result is keyed by: the code that computed it, read for its meaning.

A cached result (a sweep's run, the pre-trained checkpoint) is served only while the code that
made it still computes the same thing. That code is the entry module and every project module it
imports, directly or through others, found by reading the import statements (so a new module is
covered the moment it is imported). Each module is hashed as Python's syntax tree with docstrings
removed: comments, docstrings and layout may change freely; any change to what runs (a statement,
a constant, an import) changes the stamp. torch's version is part of it: kernels round apart
between releases.
"""
import ast
import hashlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def meaning(source: str) -> ast.Module:
    """The module's syntax tree without its docstrings (comments and layout are not in a tree)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def imported(tree: ast.Module):
    """The dotted names of every module the tree imports, at any depth (lazy imports included)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def stamp(entry: str, root: Path = ROOT) -> dict:
    """{file: hash of its meaning} for `entry` (a file under root) and every project module it
    imports, plus {"torch": torch's version}. Modules outside root (torch, the standard library)
    are named by the torch version alone."""
    found, todo = {}, [entry]
    while todo:
        name = todo.pop()
        tree = meaning((root / name).read_text())
        found[name] = sha(ast.dump(tree).encode())
        for module in imported(tree):
            base = module.replace(".", "/")
            for candidate in (f"{base}.py", f"{base}/__init__.py"):
                if (root / candidate).is_file():
                    if candidate not in found and candidate not in todo:
                        todo.append(candidate)
                    break
    return {**dict(sorted(found.items())), "torch": str(torch.__version__)}


def changed(old: dict, new: dict) -> list:
    """The names whose hash differs between two stamps (a module added or removed counts)."""
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
