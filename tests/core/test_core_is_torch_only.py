"""megasparse.core needs only torch: every core module imports with Megatron, Transformer Engine
and every megasparse package outside core, kernels and config blocked, and no core function
imports them later either."""

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import megasparse.core


def allowed(name: str) -> bool:
    """Whether a core module may import `name`: anything but Megatron, Transformer Engine and
    the megasparse packages above core (the subprocess below runs this function's source)."""
    top = name.split(".")[0]
    if top in ("megatron", "transformer_engine"):
        return False
    if top != "megasparse" or name == "megasparse":
        return True
    return any(
        name == p or name.startswith(p + ".")
        for p in ("megasparse.config", "megasparse.core", "megasparse.kernels")
    )


_IMPORT_EVERY_CORE_MODULE = inspect.getsource(allowed) + textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if not allowed(name):
                raise ImportError(f"megasparse.core must not import {name}")
            return None

    sys.meta_path.insert(0, Block())
    import megasparse.core

    names = [m.name for m in pkgutil.iter_modules(megasparse.core.__path__, "megasparse.core.")]
    for name in names:
        importlib.import_module(name)
    print(" ".join(sorted(names)))
    """
)


def test_every_core_module_imports_with_megatron_te_and_the_fp8_package_blocked():
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EVERY_CORE_MODULE], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "megasparse.core.weight_state" in result.stdout.split()


def test_no_core_function_imports_megatron_te_or_the_fp8_package_when_called():
    """Imports inside functions too (the subprocess above only runs the module level)."""
    for path in sorted(Path(megasparse.core.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                assert allowed(name), f"{path.name}:{node.lineno} imports {name}"
