"""Rerun fingerprints: a digest of the source of every `semvlp` module a rule's job runs.

A rule's job runs its handler in `semvlp.jobs` (`@handler("rule")`). The modules it runs are the
`semvlp` modules that handler imports and, transitively, everything those import (found with `ast`,
imports inside functions included, with the packages above each module), plus the modules a rule
names itself (those imported by name at run time, e.g. a fine-tuning job's task). Rules put the
digest in `params:`, so editing a module reruns exactly the jobs that run it. `semvlp.tracking` is
left out: where and how runs are logged changes no result (as the tracking config is no param).
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name
JOBS_MODULE = f"{PACKAGE}.jobs"
NOT_RESULTS = {f"{PACKAGE}.tracking"}


def module_file(name: str) -> Path | None:
    """The source file of a `semvlp` module or package (None for a name that is no module, e.g. a function)."""
    parts = name.split(".")[1:]
    path = PACKAGE_DIR.joinpath(*parts)
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _with_packages(name: str) -> set[str]:
    """`name` and the packages above it: importing `semvlp.a.b` runs `semvlp/a/__init__.py` too."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _imported(nodes, importer: str) -> set[str]:
    """The `semvlp` modules that the import statements among `nodes` (and below them) name."""
    found: set[str] = set()
    for node in (inner for top in nodes for inner in ast.walk(top)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise ValueError(f"{importer}: relative imports are not followed; import {PACKAGE}.... by its full name")
            # `from semvlp.tasks import vqa` imports the module semvlp.tasks.vqa
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == PACKAGE and module_file(name) is not None:
                found |= _with_packages(name)
    return found


@cache
def _direct_imports(name: str) -> frozenset[str]:
    path = module_file(name)
    return frozenset(_imported([ast.parse(path.read_text(), str(path))], name))


def import_closure(*modules: str) -> set[str]:
    """The modules given and every `semvlp` module they import, directly or not."""
    seen: set[str] = set()
    todo = [package for module in modules for package in _with_packages(module)]
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_RESULTS:
            continue
        seen.add(name)
        todo.extend(_direct_imports(name) - seen)
    return seen


def handler_modules(rule: str) -> set[str]:
    """The `semvlp` modules that the handler of `rule` in semvlp.jobs imports."""
    jobs_file = module_file(JOBS_MODULE)
    tree = ast.parse(jobs_file.read_text(), str(jobs_file))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(_handles(decorator, rule) for decorator in node.decorator_list):
            return _imported(node.body, JOBS_MODULE)
    raise ValueError(f"no @handler({rule!r}) in {jobs_file}")


def _handles(decorator: ast.expr, rule: str) -> bool:
    return (
        isinstance(decorator, ast.Call)
        and getattr(decorator.func, "id", None) == "handler"
        and [getattr(arg, "value", None) for arg in decorator.args] == [rule]
    )


def rule_modules(rule: str, *extra: str) -> list[str]:
    """Every module a job of `rule` runs (its handler's import closure and `extra`'s), sorted."""
    return sorted(import_closure(*handler_modules(rule), *extra))


@cache
def rule_fingerprint(rule: str, *extra: str) -> str:
    """Digest of the source of every module a job of `rule` runs; `extra` adds modules the job
    imports by name at run time."""
    digest = hashlib.sha256()
    for name in rule_modules(rule, *extra):
        digest.update(name.encode() + b"\0" + module_file(name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]
