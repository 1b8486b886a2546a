"""The package's shape, checked by walking its source with `ast`: data flows one way.

Edges (CLI, web, API, scheduler) call services; services call adapters; adapters wrap one
outside library each and never reach back up. No module imports a module that imports it back,
directly or through a chain. A new module must be given a layer here.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "appliance"

# module (dotted, below appliance) -> layer. Subpackage __init__ files are "adapter": they hold
# a docstring only.
LAYERS = {
    "__init__": "adapter",
    "config": "adapter",
    "errors": "adapter",
    "stages": "adapter",
    "users": "service",
    "doctor": "service",
    "cli.__init__": "adapter",
    "cli.__main__": "edge",
    "cli.main": "edge",
    "cli.common": "edge",
    "cli.spaces": "edge",
    "cli.gpus": "edge",
    "cli.portal": "edge",
    "cli.bundle": "edge",
    "web.__init__": "adapter",
    "web.app": "edge",
    "web.base": "edge",
    "web.pages": "edge",
    "web.api": "edge",
    "web.hf": "edge",
    "web.hf_write": "edge",
    "web.githttp": "edge",
    "web.proxy": "edge",
    "web.upstream": "edge",
    "web.offline": "edge",
    "web.gpus": "edge",
    "web.server": "edge",
    "web.hf_repo": "edge",
    "web.files": "edge",
    "gpu.__init__": "adapter",
    "gpu.nvml": "adapter",
    "gpu.allocation": "service",
    "gpu.claims": "service",
    "gpu.watchdog": "service",
    "gpu.telemetry": "service",
    "upkeep.__init__": "adapter",
    "upkeep.scheduler": "edge",
    "upkeep.reconcile": "service",
    "upkeep.health": "service",
    "upkeep.health_streamlit": "adapter",
    "upkeep.sleep": "service",
    "upkeep.updates": "service",
    "upkeep.housekeeping": "service",
    "core.__init__": "adapter",
    "core.spaces": "service",
    "core.hosted": "service",
    "core.context": "service",
    "core.actions": "service",
    "core.jobs": "service",
    "core.builds": "service",
    "core.bundles": "service",
    "core.manifest": "adapter",
    "core.sources": "adapter",
    "core.packages": "adapter",
    "core.repository": "service",
    # Copied into static Spaces' containers and run there: the standard library only.
    "core.static_server": "standalone",
    "adapters.__init__": "adapter",
    "adapters.store": "adapter",
    "adapters.runtime": "adapter",
    "adapters.router": "adapter",
    "adapters.host": "adapter",
}

# layer -> the layers its modules may import from the package.
MAY_IMPORT = {
    "edge": {"edge", "service", "adapter"},
    "service": {"service", "adapter"},
    "adapter": {"adapter"},
    "standalone": set(),
}

# third-party library -> the one module allowed to import it.
WRAPPED_BY = {"sqlite_utils": "adapters.store", "podman": "adapters.runtime",
              "pynvml": "gpu.nvml", "gunicorn": "web.server",
              "websocket": "upkeep.health_streamlit"}

SUBPROCESS_CALLS = {
    ("subprocess", "run"), ("subprocess", "Popen"), ("subprocess", "call"),
    ("subprocess", "check_call"), ("subprocess", "check_output"),
    ("os", "execv"), ("os", "execvp"), ("os", "execvpe"), ("os", "execve"),
    ("os", "spawnv"), ("os", "spawnvp"), ("os", "posix_spawn"), ("os", "posix_spawnp"),
    ("asyncio", "create_subprocess_exec"),
}


def module_name(path: Path) -> str:
    """appliance/core/spaces.py -> "core.spaces"; appliance/cli/__init__.py -> "cli.__init__"."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def modules() -> dict[str, ast.Module]:
    return {
        module_name(path): ast.parse(path.read_text(), filename=str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def package_imports(tree: ast.Module, name: str = "__init__",
                    known: set[str] | None = None) -> set[str]:
    """Name the package modules a module imports, anywhere in it (functions included).

    Names are dotted below appliance ("core.spaces"). `from ..core import spaces` names the
    module core.spaces when it is one (known), else the package core itself ("core.__init__").
    """
    known = set(LAYERS) if known is None else known
    package = name.split(".")[:-1]  # the package the module is in ([] at the top)

    def module_or_package(parts: list[str]) -> str:
        dotted = ".".join(parts)
        return dotted if dotted in known else ".".join([*parts, "__init__"])

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "appliance":
                    continue
                base = parts[1:]
            else:
                up = node.level - 1
                assert up <= len(package), f"{name}: an import above the package"
                base = package[:len(package) - up] + (node.module.split(".") if node.module
                                                      else [])
            for alias in node.names:
                if ".".join([*base, alias.name]) in known:
                    found.add(".".join([*base, alias.name]))  # a module: from ..core import spaces
                else:
                    found.add(module_or_package(base))  # a name: from ..core.spaces import X
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "appliance" and len(parts) > 1:
                    found.add(module_or_package(parts[1:]))
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: package_imports(tree, name, set(trees)) for name, tree in trees.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach one another through imports (Tarjan's SCCs, size > 1
    or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def third_party_imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def runs_git(tree: ast.Module) -> bool:
    """Tell whether a module starts a process whose argv[0] is "git" (or a constant naming it)."""
    git_names = {
        target.id
        for node in tree.body if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name) and isinstance(node.value, ast.Constant)
        and node.value.value == "git"
    }
    argv_lists = {}  # name -> the list literal assigned to it, for `cmd = [...]; run(cmd)`
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List | ast.Tuple):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    argv_lists[target.id] = node.value

    def is_git(node: ast.AST) -> bool:
        return (isinstance(node, ast.Constant) and node.value == "git") or (
            isinstance(node, ast.Name) and node.id in git_names)

    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and (node.func.value.id, node.func.attr) in SUBPROCESS_CALLS):
            continue
        argv = [*node.args, *(k.value for k in node.keywords if k.arg == "args")]
        for arg in argv:
            if isinstance(arg, ast.Name) and arg.id in argv_lists:
                arg = argv_lists[arg.id]
            if isinstance(arg, ast.List | ast.Tuple) and arg.elts and is_git(arg.elts[0]):
                return True
            if is_git(arg):
                return True
    return False


_ENV_ATTRS = {"environ", "environb", "getenv", "getenvb"}


def import_time_environ_reads(tree: ast.Module) -> list[int]:
    """Line numbers where os.environ / os.getenv run at import time (outside function bodies)."""
    env_names = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "os"
        for alias in node.names if alias.name in _ENV_ATTRS
    }
    lines = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            # Decorators and default values are evaluated at import time; bodies are not.
            args = node.args
            for child in [*getattr(node, "decorator_list", []), *args.defaults,
                          *(d for d in args.kw_defaults if d is not None)]:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom | ast.Import):
            return
        if (isinstance(node, ast.Attribute) and node.attr in _ENV_ATTRS
                and isinstance(node.value, ast.Name) and node.value.id == "os") or (
                isinstance(node, ast.Name) and node.id in env_names):
            lines.append(node.lineno)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return lines


# -- the checkers themselves catch what they are meant to ------------------------------------


def test_checkers_flag_a_module_that_breaks_every_rule():
    tree = ast.parse(
        "import os, subprocess\n"
        "from .. import errors\n"
        "from ..cli.main import main\n"
        "from appliance.web.app import create_app\n"
        "from . import spaces\n"
        "import sqlite_utils\n"
        "TOKEN = os.environ.get('X')\n"
        "class C:\n"
        "    home = os.getenv('HOME')\n"
        "def f(x=os.environ['Y']):\n"
        "    cmd = ['git', 'clone']\n"
        "    subprocess.run(cmd)\n"
        "    return os.environ\n"
    )
    assert package_imports(tree, "core.builds") == {"errors", "cli.main", "web.app",
                                                    "core.spaces"}
    assert "sqlite_utils" in third_party_imports(tree)
    assert runs_git(tree)
    assert import_time_environ_reads(tree) == [7, 9, 10]


def test_checkers_pass_a_module_that_keeps_the_rules():
    tree = ast.parse(
        "'''Docstring.'''\n"
        "import os, shutil, subprocess\n"
        "from ..errors import Conflict\n"
        "def f():\n"
        "    shutil.which('git')\n"
        "    subprocess.run(['podman', 'info'], env={'A': 'git'})\n"
        "    return os.environ.get('X')\n"
    )
    assert package_imports(tree, "core.builds") == {"errors"}
    assert not runs_git(tree)
    assert import_time_environ_reads(tree) == []


def test_circle_finder_names_a_chain_that_comes_back():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert circles(graph) == [["a", "b", "c"], ["e"]]
    assert circles({"a": {"b"}, "b": set()}) == []


# -- the package ----------------------------------------------------------------------------


def test_every_module_is_given_a_layer():
    unclassified = set(modules()) - set(LAYERS)
    assert not unclassified, f"add these modules to LAYERS in {__file__}: {unclassified}"
    gone = set(LAYERS) - set(modules())
    assert not gone, f"LAYERS names modules that no longer exist: {gone}"


def test_no_module_imports_a_module_that_imports_it_back():
    found = circles(import_graph())
    assert not found, f"import circles (each group reaches itself): {found}"


@pytest.mark.parametrize("name", sorted(module_name(p) for p in PACKAGE.rglob("*.py")))
def test_module_imports_only_from_its_own_layer_or_below(name):
    trees = modules()
    layer = LAYERS.get(name)
    if layer is None:
        pytest.fail(f"{name} has no layer in LAYERS")
    wrong = {
        f"{imported} ({LAYERS.get(imported, 'unknown')})"
        for imported in package_imports(trees[name], name, set(trees))
        if LAYERS.get(imported) not in MAY_IMPORT[layer]
    }
    assert not wrong, f"{name} ({layer}) imports {sorted(wrong)}"


def test_adapters_never_import_services_or_edges():
    trees = modules()
    for name, tree in trees.items():
        if LAYERS.get(name) == "adapter":
            above = {m for m in package_imports(tree, name, set(trees))
                     if LAYERS.get(m) in {"service", "edge"}}
            assert not above, f"{name} imports {above}"


def test_no_module_keeps_a_prefix_its_folder_already_says():
    """web/proxy.py, not web/web_proxy.py; and no flat web_*/cli_*/gpu_* modules are left."""
    for name in modules():
        parts = name.split(".")
        if len(parts) == 1:
            assert not parts[0].startswith(("web_", "cli_", "gpu_")), name
        else:
            assert not parts[-1].startswith(parts[0] + "_"), name


@pytest.mark.parametrize("library", sorted(WRAPPED_BY))
def test_each_io_library_is_imported_by_its_one_adapter(library):
    importers = {name for name, tree in modules().items() if library in third_party_imports(tree)}
    assert importers <= {WRAPPED_BY[library]}


def test_store_and_runtime_are_the_ones_wrapping_sqlite_utils_and_podman():
    trees = modules()
    assert "sqlite_utils" in third_party_imports(trees["adapters.store"])
    assert "podman" in third_party_imports(trees["adapters.runtime"])


def test_gpu_is_the_one_wrapping_pynvml():
    assert "pynvml" in third_party_imports(modules()["gpu.nvml"])


def test_only_sources_runs_git():
    # sources fetches from elsewhere; repository reads the checkouts already here, read-only.
    assert {name for name, tree in modules().items() if runs_git(tree)} == {"core.sources",
                                                                         "core.repository"}


def test_nothing_reads_the_environment_at_import_time():
    found = {name: lines for name, tree in modules().items()
             if (lines := import_time_environ_reads(tree))}
    assert not found, f"environment read at import time (module: lines): {found}"


def test_every_module_starts_with_a_docstring():
    for name, tree in modules().items():
        first = tree.body[0] if tree.body else None
        assert (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str) and first.value.value.strip()), \
            f"{name} does not start with a docstring"
