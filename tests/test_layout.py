"""The rooms keep their walls: imports flow suppression <- tracking <- relay, the front door
and delivery never import each other, no module imports itself round a circle, and a CLI
command loads only what it runs."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("suppression", "tracking", "relay")
# What `suppress check` must not load: the servers, the template engine, delivery, signing,
# and on an SQLite store the PostgreSQL driver.
HEAVY = (
    "aiohttp",
    "psycopg",
    "suppression.postgres",
    "aiosmtpd",
    "cryptography",
    "relay.app",
    "relay.smtpd",
    "relay.rewrite",
    "relay.delivery",
    "relay.pipeline",
    "relay.dkim",
    "tracking.app",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> Iterator[str]:
    """Modules imported when `path` is imported: its top-level statements, not imports
    inside functions or under `if TYPE_CHECKING:`."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target
            # `from . import cli_x` names modules too.
            yield from (f"{target}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    # A module's own packages are imported before it in any case: no edge to them.
    return {
        name: {
            target
            for target in _top_level_imports(path)
            if target in modules and not name.startswith(target + ".")
        }
        for name, path in modules.items()
    }


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_imports_flow_one_way_between_packages() -> None:
    lower_than = {"suppression": ("tracking", "relay"), "tracking": ("relay",)}
    wrong = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        for package, uppers in lower_than.items()
        if _in(module, package) and any(_in(target, upper) for upper in uppers)
    ]
    assert wrong == []


def test_the_front_door_and_delivery_never_import_each_other() -> None:
    rooms = ("relay.smtpd", "relay.delivery")
    wrong = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        for here, there in (rooms, rooms[::-1])
        if _in(module, here) and _in(target, there)
    ]
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def _loaded_after(code: str, cwd: Path) -> list[str]:
    probe = (
        f"import json, sys\n{code}\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({HEAVY!r}))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout, not an installed copy
    )
    loaded: list[str] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def test_importing_the_cli_loads_no_server(tmp_path: Path) -> None:
    assert _loaded_after("import relay.cli", tmp_path) == []


def test_suppress_check_loads_neither_servers_nor_delivery(tmp_path: Path) -> None:
    _loaded_after(  # a store to check against (a command that only reads creates none)
        "from relay.cli import main\n"
        "try:\n"
        "    main(['suppress', 'add', 'other@example.org'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n",
        tmp_path,
    )
    run = (
        "from relay.cli import main\n"
        "try:\n"
        "    main(['suppress', 'check', 'someone@example.org'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 1, exit.code\n"
    )
    assert _loaded_after(run, tmp_path) == []
    assert (tmp_path / "optout-data" / "optout.db").exists()
