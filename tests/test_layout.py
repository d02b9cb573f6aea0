"""The package layout rules that can be measured, checked by reading the source (no imports).

* every module in ``jaxlora/`` is at most 300 lines long;
* every function in ``jaxlora/`` is at most 60 lines, from its ``def`` line to the end of its body,
  not counting its docstring;
* only ``jaxlora/models/`` imports ``jaxlora.models`` (in any form, also inside functions);
* no module in ``jaxlora/``, ``tests/``, ``experiments/`` or ``notebooks/`` imports an underscored
  name from another module (``from a import _b``, ``import a._b``) or reads one off an imported
  module (``mod._b``, ``getattr(mod, "_b")``, ``monkeypatch.setattr(mod, "_b", ...)``); dunders
  are not underscored names, and ``jaxlora._src`` is the private package that may be imported;
  the other exceptions are :data:`STDLIB_HOOKS`;
* ``jaxlora/`` has at most 12 public top-level modules and packages;
* every public module has an ``__all__``, sorted (plainly, or isort-style as ruff's RUF022 sorts:
  CONSTANTS, CamelCase, the rest), that matches its imports: a module that only
  re-exports lists exactly the names it imports, and any module lists every name it re-exports
  with ``import x as x`` and only names it binds.

Each failure names the rule and every offending ``file:line``.
"""

import ast
import functools
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxlora"
SCANNED_ROOTS = ("jaxlora", "tests", "experiments", "notebooks")
PRIVATE_PACKAGE = "jaxlora._src"
#: Underscored standard-library names with no public equivalent, each with the reason it is needed.
STDLIB_HOOKS = {
    # The only hook that runs at exit before the interpreter joins its threads and before
    # concurrent.futures stops taking work (concurrent.futures registers itself with it): an
    # unclosed async checkpoint manager's save must finish there, or orbax's threads hang the exit.
    "threading._register_atexit",
    # The documented way to end a process without its exit handlers (tests/conftest.py: an xdist
    # worker that has reported everything skips JAX's teardown of its compiled programs).
    "os._exit",
}
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60
MAX_PUBLIC_MODULES = 12
ATTRIBUTE_FUNCTIONS = ("getattr", "setattr", "hasattr", "delattr")


def _python_files(root):
    return sorted(p for p in (ROOT / root).rglob("*.py") if ".ipynb_checkpoints" not in p.parts)


def _where(path, line):
    return f"{path.relative_to(ROOT)}:{line}"


@functools.cache
def _tree(path):
    return ast.parse(path.read_text(), filename=str(path))


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path):
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(path, node):
    """The absolute module name of an ``ImportFrom``, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = _package_of(path).split(".")
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name):
    return (
        name.startswith("_") and name != "_" and not (name.startswith("__") and name.endswith("__"))
    )


def _allowed_private(dotted):
    return (
        dotted == PRIVATE_PACKAGE or dotted.startswith(PRIVATE_PACKAGE + ".")
    ) or dotted in STDLIB_HOOKS


def _is_local_module(dotted):
    relative = pathlib.Path(*dotted.split("."))
    return (ROOT / relative).with_suffix(".py").is_file() or (
        ROOT / relative / "__init__.py"
    ).is_file()


def _module_names(path):
    """Names bound to modules anywhere in the file -> the module's dotted name."""
    names = {}
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    root = alias.name.split(".")[0]
                    names[root] = root
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(path, node)
            for alias in node.names:
                dotted = f"{module}.{alias.name}" if module else alias.name
                if alias.name != "*" and _is_local_module(dotted):
                    names[alias.asname or alias.name] = dotted
    return names


def _dotted(node, modules):
    """``a.b.c`` for a chain of attributes on a module name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in modules:
        return ".".join([modules[node.id], *reversed(parts)])
    return None


def _private_access(path):
    """(line, what) for every underscored name taken from another module."""
    modules = _module_names(path)
    found = []

    def check(line, owner, name, how):
        if owner is not None and _is_private(name) and not _allowed_private(f"{owner}.{name}"):
            found.append((line, f"{how} `{owner}.{name}`"))

    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                for i, part in enumerate(parts[1:], start=1):
                    check(node.lineno, ".".join(parts[:i]), part, "imports")
        elif isinstance(node, ast.ImportFrom):
            parts = _resolve(path, node).split(".")
            for i, part in enumerate(parts[1:], start=1):
                check(node.lineno, ".".join(parts[:i]), part, "imports from")
            for alias in node.names:
                check(node.lineno, ".".join(parts), alias.name, "imports")
        elif isinstance(node, ast.Attribute):
            check(node.lineno, _dotted(node.value, modules), node.attr, "reads")
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            target, attr = node.args[0], node.args[1]
            if name in ATTRIBUTE_FUNCTIONS and isinstance(attr, ast.Constant):
                if isinstance(attr.value, str):
                    check(node.lineno, _dotted(target, modules), attr.value, f"{name}s")
    return found


def _imports_models(path, node):
    models = "jaxlora.models"
    if isinstance(node, ast.Import):
        return any(a.name == models or a.name.startswith(models + ".") for a in node.names)
    if isinstance(node, ast.ImportFrom):
        module = _resolve(path, node)
        if module == models or module.startswith(models + "."):
            return True
        return module == "jaxlora" and any(a.name == "models" for a in node.names)
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        value = node.args[0].value
        return (
            name in ("import_module", "__import__")
            and isinstance(value, str)
            and (value == models or value.startswith(models + "."))
        )
    return False


def _docstring_lines(node):
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return first.end_lineno - first.lineno + 1
    return 0


def _public_modules():
    return [
        p
        for p in _python_files("jaxlora")
        if not any(_is_private(part) for part in p.relative_to(ROOT).with_suffix("").parts)
    ]


def _natural(name):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _isort_key(name):
    """ruff's isort-style order for ``__all__``: CONSTANTS, then CamelCase, then the rest."""
    if name.upper() == name and any(c.isalpha() for c in name):
        return 0, _natural(name)
    return (1 if name[:1].isupper() else 2), _natural(name)


def _is_sorted(names):
    return names == sorted(names) or names == sorted(names, key=_isort_key)


def _fail(rule, violations):
    assert not violations, f"{rule}:\n" + "\n".join(violations)


def test_no_module_is_over_300_lines():
    violations = []
    for path in _python_files("jaxlora"):
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            violations.append(f"{_where(path, lines)}: {lines} lines")
    _fail(f"layout rule: a module in jaxlora/ has at most {MAX_MODULE_LINES} lines", violations)


def test_no_function_is_over_60_lines():
    violations = []
    for path in _python_files("jaxlora"):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
                if lines > MAX_FUNCTION_LINES:
                    violations.append(f"{_where(path, node.lineno)}: `{node.name}` has {lines}")
    _fail(
        f"layout rule: a function in jaxlora/ has at most {MAX_FUNCTION_LINES} lines of code "
        "(from `def` to the end of its body, docstring excluded)",
        violations,
    )


def test_only_models_imports_models():
    violations = []
    for path in _python_files("jaxlora"):
        if path.is_relative_to(PACKAGE / "models"):
            continue
        for node in ast.walk(_tree(path)):
            if _imports_models(path, node):
                violations.append(f"{_where(path, node.lineno)}: imports jaxlora.models")
    _fail("layout rule: no module outside jaxlora/models/ imports jaxlora.models", violations)


@pytest.mark.parametrize("root", SCANNED_ROOTS)
def test_no_underscored_name_crosses_modules(root):
    violations = [
        f"{_where(path, line)}: {what}"
        for path in _python_files(root)
        for line, what in sorted(_private_access(path))
    ]
    _fail(
        f"layout rule: no import of an underscored name across modules in {root}/ "
        f"(only `{PRIVATE_PACKAGE}` module paths are allowed)",
        violations,
    )


def test_at_most_12_public_top_level_modules():
    public = sorted(
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if not p.name.startswith("_")
        and ((p.suffix == ".py" and p.is_file()) or (p / "__init__.py").is_file())
    )
    assert len(public) <= MAX_PUBLIC_MODULES, (
        f"layout rule: at most {MAX_PUBLIC_MODULES} public top-level modules in jaxlora/, "
        f"found {len(public)} ({_where(PACKAGE / '__init__.py', 1)}): {public}"
    )


def _all_and_bindings(path):
    """``__all__`` (node), imported names, names re-exported with ``as`` the same name, and
    names defined by the module itself."""
    all_node, imported, reexported, defined = None, {}, set(), set()
    for node in _tree(path).body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            for alias in node.names:
                name = alias.asname or alias.name.split(".")[0]
                imported[name] = node.lineno
                if alias.asname == alias.name.rpartition(".")[2]:
                    reexported.add(name)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id == "__all__":
                    all_node = node
                elif isinstance(target, ast.Name):
                    defined.add(target.id)
    return all_node, imported, reexported, defined


@pytest.mark.parametrize(
    "path", _public_modules(), ids=lambda p: str(p.relative_to(ROOT).as_posix())
)
def test_public_all_is_sorted_and_matches_the_imports(path):
    all_node, imported, reexported, defined = _all_and_bindings(path)
    rule = "layout rule: a public module's `__all__` is sorted and matches its imports"
    assert all_node is not None, f"{rule}:\n{_where(path, 1)}: no `__all__`"
    try:
        names = ast.literal_eval(all_node.value)
    except ValueError:
        pytest.fail(f"{rule}:\n{_where(path, all_node.lineno)}: `__all__` is not a literal")
    where = _where(path, all_node.lineno)
    violations = []
    if not _is_sorted(list(names)):
        violations.append(f"{where}: `__all__` is not sorted (plainly or isort-style)")
    if len(set(names)) != len(names):
        violations.append(f"{where}: `__all__` lists a name twice")
    unbound = sorted(set(names) - set(imported) - defined)
    if unbound:
        violations.append(f"{where}: `__all__` lists names the module does not bind: {unbound}")
    # A module that only re-exports lists everything it imports; any module lists every
    # `import x as x` re-export.
    expected = set(imported) if not defined - {"__version__"} else reexported
    for name in sorted(expected - set(names)):
        violations.append(
            f"{_where(path, imported[name])}: `{name}` is imported but not in `__all__`"
        )
    _fail(rule, violations)
