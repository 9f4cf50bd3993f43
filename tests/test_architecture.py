"""The house in wings: every import inside ``stages`` (top-level or local, ``TYPE_CHECKING`` included)
goes to the module's own floor or a lower one, there are no import circles, the networks do no I/O,
and nothing in ``stages`` imports the command line."""
import ast
from pathlib import Path

from tests.helpers import REPO

STAGES = REPO / "stages"
# The floors, lowest first; a module imports from its own floor or the ones below it.
FLOORS = [
    ("shared", {"stages", "stages.errors", "stages.options", "stages.presets", "stages.dist", "stages.progress",
                "stages.flow", "stages.digests"}),
    ("models", "stages.models"),
    ("artifacts", "stages.artifacts"),
    ("generation", {"stages.generation"}),  # sampling from a run: `rae sample` and `rae eval --model`
    ("eval", "stages.eval"),  # below train: the trainers score their runs while they train
    ("train", "stages.train"),
    ("verbs", {"stages.encode", "stages.sample", "stages.decode", "stages.importer", "stages.crop",
               "stages.ema"}),
    ("demo", "stages.demo"),
]
# Wings that must not import each other.
APART: list[tuple[str, str]] = []
NETWORKS = ("stages.models.dit", "stages.models.decoder", "stages.models.discriminator", "stages.models.pos_embed",
            "stages.models.fp8", "stages.models.fp8_triton", "stages.models.adaln_triton", "stages.models.imagenet")


def _name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The stages modules ``path`` imports (a ``from X import name`` counts as X.name when that is a module)."""
    module = _name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in ("stages", "rae_cli")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] not in ("stages", "rae_cli"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if _exists(sub) else target)
    return found


def _exists(module: str) -> bool:
    p = REPO.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _floor(module: str) -> int:
    for i, (_, members) in enumerate(FLOORS):
        if isinstance(members, set) and module in members:
            return i
        if isinstance(members, str) and (module == members or module.startswith(members + ".")):
            return i
    raise AssertionError(f"{module} is on no floor: add it to FLOORS (and to the README's tree)")


def _graph() -> dict[str, set[str]]:
    return {_name(p): _imports(p) for p in sorted(STAGES.rglob("*.py"))}


def test_every_module_is_on_a_floor_and_imports_only_downwards():
    climbing = []
    for module, deps in _graph().items():
        for dep in deps:
            assert not dep.startswith("rae_cli"), f"{module} imports the command line ({dep})"
            if _floor(dep) > _floor(module):
                climbing.append(f"{module} ({FLOORS[_floor(module)][0]}) -> {dep} ({FLOORS[_floor(dep)][0]})")
            for a, b in APART:
                if (module.startswith(a) and dep.startswith(b)) or (module.startswith(b) and dep.startswith(a)):
                    climbing.append(f"{module} -> {dep}: {a} and {b} stay apart")
    assert not climbing, "imports that climb a floor:\n" + "\n".join(sorted(climbing))


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if dep == m or dep not in graph:
                continue
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_networks_do_no_io():
    graph = _graph()
    for net in NETWORKS:
        outside = {d for d in graph[net] if d not in NETWORKS and d not in ("stages", "stages.errors")}
        assert not outside, f"{net} imports {outside}: networks take their weights as arguments"
