"""The shape of the code, checked: `python -m pytest tests/unit/test_architecture.py` (docs/architecture.md).

- No import cycles among proto/ and services/ (every import counts, those inside functions too, and
  importing a.b.c imports the packages a and a.b first; only `if TYPE_CHECKING:` imports are exempt).
- No subject spelled outside proto/: subjects come from proto.topology's builders.
- The service list is proto.topology.SERVICES; systemd/ and ops/install.sh follow it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from proto.topology import SERVICES

REPO = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for top in ("proto", "services") for p in (REPO / top).rglob("*.py")}


def imported(path: Path) -> set[str]:
    """Modules of ours that importing `path` runs (with the packages above each), TYPE_CHECKING aside."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)  # `from pkg import module`
            visit(child)

    visit(ast.parse(path.read_text()))
    out = set()
    for name in found:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in out if m in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycles():
    graph = {m: imported(p) - {m} for m, p in MODULES.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


SUBJECT = re.compile(r"^vigil\.(uploads|detections|events|alerts|dlq|gpu|health|retention|control)\b")


def subject_literals(path: Path) -> list[tuple[int, str]]:
    """String constants that spell a vigil subject (docstrings aside: prose may name them)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and SUBJECT.match(node.value)
        ):
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            head = node.values[0].value
            if isinstance(head, str) and SUBJECT.match(head):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_subject_is_spelled_outside_proto():
    spelled = {
        str(p.relative_to(REPO)): found
        for m, p in MODULES.items()
        if not m.startswith("proto") and (found := subject_literals(p))
    }
    assert spelled == {}


def test_the_service_list_is_the_units_and_the_installers():
    units = {p.name for p in (REPO / "systemd").glob("*.service")}
    expected = {f"vigil-{s}@.service" if s == "detector" else f"vigil-{s}.service" for s in SERVICES}
    assert units - {"vigil-nats.service", "vigil-postgresql.service"} == expected
    install = (REPO / "ops" / "install.sh").read_text()
    users = re.search(r"^for u in ([a-z -]+); do", install, re.M).group(1).split()
    assert set(users) - {"nats", "postgres"} == set(SERVICES)  # a system user per service
    for s in SERVICES:
        assert f"nats-{s}" in install  # and its NATS credential
    # the web UI's polkit rule names every service unit but its own (restart only) and the detector's template
    rule = (REPO / "ops" / "polkit" / "50-vigil-web.rules").read_text()
    listed = re.search(r"var services = \[([^\]]*)\]", rule).group(1)
    assert sorted(re.findall(r'"([a-z-]+)"', listed)) == sorted(set(SERVICES) - {"web", "detector"})


def test_services_that_never_touch_the_database_do_not_load_psycopg():
    """Every service starts through `vigil run` (services/cli/main.py): a heavy import reached from the
    CLI lands in every process. psycopg alone measured 9 MB of RSS in each (watcher 59 -> 69 MB)."""
    import subprocess
    import sys

    code = (
        "import sys, services.cli.main, services.watcher.service, services.detector.service, "
        "services.aggregator.service, services.gpu_stats.service; "
        "print(sorted(m for m in ('psycopg', 'psycopg_binary') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"
