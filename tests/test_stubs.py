"""The ``_relay/*.pyi`` stubs that mypy reads describe the compiled modules: same names, same parameters.

A name one side has and the other lacks fails the test, so a change to the .pyx that is not made in
the stub (or the reverse) is caught here rather than by a type checker believing an old stub.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import types
from pathlib import Path

import pytest

import _relay.codec
import _relay.relay

STUBS = Path(_relay.__file__).parent
MODULES = [_relay.codec, _relay.relay]


def _public(name: str) -> bool:
    return not name.startswith("_")


def _stub_names(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """The public names a stub body defines (imports are not names of the module)."""
    names: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, ast.Assign):
            names.update((t.id, node) for t in node.targets if isinstance(t, ast.Name))
    return {name: node for name, node in names.items() if _public(name)}


def _compiled_names(module: types.ModuleType) -> dict[str, object]:
    """The public names the compiled module defines (not the modules and classes it imported)."""
    names = {}
    for name, value in vars(module).items():
        if not _public(name) or isinstance(value, types.ModuleType):
            continue
        if (inspect.isclass(value) or callable(value)) and getattr(value, "__module__", module.__name__) != module.__name__:
            continue
        names[name] = value
    return names


def _stub(module: types.ModuleType) -> ast.Module:
    return ast.parse((STUBS / f"{module.__name__.rpartition('.')[2]}.pyi").read_text())


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_stub_names_match_the_compiled_module(module):
    stub, compiled = _stub_names(_stub(module).body), _compiled_names(module)
    assert sorted(set(compiled) - set(stub)) == [], f"in {module.__name__} but not in its .pyi"
    assert sorted(set(stub) - set(compiled)) == [], f"in the .pyi but not in {module.__name__}"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_stub_classes_have_the_compiled_members(module):
    for name, node in _stub_names(_stub(module).body).items():
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(module, name)
        stub = set(_stub_names(node.body))
        compiled = {member for member in vars(cls) if _public(member)}
        assert sorted(compiled - stub) == [], f"{module.__name__}.{name} has members its stub lacks"
        assert sorted(stub - compiled) == [], f"the stub of {module.__name__}.{name} has members it lacks"


def _parameters(node: ast.FunctionDef) -> list[str]:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args]
    if args.vararg:
        names.append("*" + args.vararg.arg)
    names += [a.arg for a in args.kwonlyargs]
    return names


def _compiled_parameters(func: object) -> list[str]:
    return [("*" if p.kind is p.VAR_POSITIONAL else "") + p.name for p in inspect.signature(func).parameters.values()]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_stub_functions_take_the_compiled_parameters(module):
    """Module functions and methods (``__init__`` stands for ``__cinit__``, which has no signature)."""
    checked = 0
    for name, node in _stub_names(_stub(module).body).items():
        methods = [(getattr(module, name), n) for n in node.body if isinstance(n, ast.FunctionDef)] \
            if isinstance(node, ast.ClassDef) else [(module, node)]
        for owner, func in methods:
            if not isinstance(func, ast.FunctionDef) or not _public(func.name):
                continue
            if any(isinstance(d, ast.Name) and d.id == "property" for d in func.decorator_list):
                continue
            target = getattr(owner, func.name)
            where = module.__name__ + (f".{name}" if owner is not module else "") + f".{func.name}"
            assert _parameters(func) == _compiled_parameters(target), where
            checked += 1
    assert checked, "no function compared"


def test_mypy_reads_the_stubs(tmp_path):
    """mypy types the compiled modules from the stubs: a call against them is checked, not Any."""
    snippet = "from _relay import codec, relay\ncodec.header('x', 1)\nrelay.RelayServer(b'k', lambda p: (p, {}, False, p)).stats().bad\n"
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file=", "--cache-dir", str(tmp_path), "--no-error-summary", "-c", snippet],
        capture_output=True, text=True, cwd=STUBS.parent, timeout=300,
    )
    print(out.stdout)
    assert 'Argument 1 to "header" has incompatible type "str"; expected "int"' in out.stdout, out.stdout + out.stderr
    assert '"dict[str, Any]" has no attribute "bad"' in out.stdout, out.stdout + out.stderr
