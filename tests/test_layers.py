"""The package's shape, checked by walking its source with `ast`: data flows one way.

Edges (CLI, web, API, scheduler) call services; services call adapters; adapters wrap one
outside library each and never reach back up. A new module must be given a layer here.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "appliance"

# module -> layer. Edges not yet written are listed so they are classified the day they land.
LAYERS = {
    "cli": "edge",
    "cli_common": "edge",
    "cli_spaces": "edge",
    "cli_gpus": "edge",
    "cli_portal": "edge",
    "cli_bundle": "edge",
    "web": "edge",
    "web_pages": "edge",
    "web_api": "edge",
    "web_hf": "edge",
    "web_proxy": "edge",
    "web_upstream": "edge",
    "web_offline": "edge",
    "web_gpus": "edge",
    "web_server": "edge",
    "scheduler": "edge",
    "spaces": "service",
    "bundles": "service",
    "builds": "service",
    "doctor": "service",
    "jobs": "service",
    "reconcile": "service",
    "allocation": "service",
    "gpus": "service",
    "gpu_watchdog": "service",
    "housekeeping": "service",
    "health": "service",
    "updates": "service",
    "sleep": "service",
    "telemetry": "service",
    "users": "service",
    "space_actions": "service",
    "store": "adapter",
    "runtime": "adapter",
    "sources": "adapter",
    "host": "adapter",
    "gpu": "adapter",
    "router": "adapter",
    "health_streamlit": "adapter",
    "manifest": "adapter",
    "config": "adapter",
    "errors": "adapter",
    "stages": "adapter",
    "__init__": "adapter",
    # Copied into static Spaces' containers and run there: the standard library only.
    "static_server": "standalone",
}

# layer -> the layers its modules may import from the package.
MAY_IMPORT = {
    "edge": {"edge", "service", "adapter"},
    "service": {"service", "adapter"},
    "adapter": {"adapter"},
    "standalone": set(),
}

# third-party library -> the one module allowed to import it.
WRAPPED_BY = {"sqlite_utils": "store", "podman": "runtime", "pynvml": "gpu",
              "gunicorn": "web_server", "websocket": "health_streamlit"}

SUBPROCESS_CALLS = {
    ("subprocess", "run"), ("subprocess", "Popen"), ("subprocess", "call"),
    ("subprocess", "check_call"), ("subprocess", "check_output"),
    ("os", "execv"), ("os", "execvp"), ("os", "execvpe"), ("os", "execve"),
    ("os", "spawnv"), ("os", "spawnvp"), ("os", "posix_spawn"), ("os", "posix_spawnp"),
    ("asyncio", "create_subprocess_exec"),
}


def modules() -> dict[str, ast.Module]:
    return {
        path.stem: ast.parse(path.read_text(), filename=str(path))
        for path in sorted(PACKAGE.glob("*.py"))
    }


def package_imports(tree: ast.Module) -> set[str]:
    """Name the package modules a module imports, anywhere in it (functions included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.split(".")[0] == "appliance":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
            elif node.level == 1:
                found.update([node.module.split(".")[0]] if node.module
                             else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "appliance" and len(parts) > 1:
                    found.add(parts[1])
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
        "from . import spaces\n"
        "from .cli import main\n"
        "from appliance.web import create_app\n"
        "import sqlite_utils\n"
        "TOKEN = os.environ.get('X')\n"
        "class C:\n"
        "    home = os.getenv('HOME')\n"
        "def f(x=os.environ['Y']):\n"
        "    cmd = ['git', 'clone']\n"
        "    subprocess.run(cmd)\n"
        "    return os.environ\n"
    )
    assert package_imports(tree) == {"spaces", "cli", "web"}
    assert "sqlite_utils" in third_party_imports(tree)
    assert runs_git(tree)
    assert import_time_environ_reads(tree) == [6, 8, 9]


def test_checkers_pass_a_module_that_keeps_the_rules():
    tree = ast.parse(
        "'''Docstring.'''\n"
        "import os, shutil, subprocess\n"
        "from .errors import Conflict\n"
        "def f():\n"
        "    shutil.which('git')\n"
        "    subprocess.run(['podman', 'info'], env={'A': 'git'})\n"
        "    return os.environ.get('X')\n"
    )
    assert package_imports(tree) == {"errors"}
    assert not runs_git(tree)
    assert import_time_environ_reads(tree) == []


# -- the package ----------------------------------------------------------------------------


def test_every_module_is_given_a_layer():
    unclassified = set(modules()) - set(LAYERS)
    assert not unclassified, f"add these modules to LAYERS in {__file__}: {unclassified}"


@pytest.mark.parametrize("name", sorted(p.stem for p in PACKAGE.glob("*.py")))
def test_module_imports_only_from_its_own_layer_or_below(name):
    tree = modules()[name]
    layer = LAYERS.get(name)
    if layer is None:
        pytest.fail(f"{name}.py has no layer in LAYERS")
    wrong = {
        f"{imported} ({LAYERS.get(imported, 'unknown')})"
        for imported in package_imports(tree)
        if LAYERS.get(imported) not in MAY_IMPORT[layer]
    }
    assert not wrong, f"{name}.py ({layer}) imports {sorted(wrong)}"


def test_adapters_never_import_services_or_edges():
    for name, tree in modules().items():
        if LAYERS.get(name) == "adapter":
            above = {m for m in package_imports(tree) if LAYERS.get(m) in {"service", "edge"}}
            assert not above, f"{name}.py imports {above}"


@pytest.mark.parametrize("library", sorted(WRAPPED_BY))
def test_each_io_library_is_imported_by_its_one_adapter(library):
    importers = {name for name, tree in modules().items() if library in third_party_imports(tree)}
    assert importers <= {WRAPPED_BY[library]}


def test_store_and_runtime_are_the_ones_wrapping_sqlite_utils_and_podman():
    trees = modules()
    assert "sqlite_utils" in third_party_imports(trees["store"])
    assert "podman" in third_party_imports(trees["runtime"])


def test_gpu_is_the_one_wrapping_pynvml():
    assert "pynvml" in third_party_imports(modules()["gpu"])


def test_only_sources_runs_git():
    assert {name for name, tree in modules().items() if runs_git(tree)} == {"sources"}


def test_nothing_reads_the_environment_at_import_time():
    found = {name: lines for name, tree in modules().items()
             if (lines := import_time_environ_reads(tree))}
    assert not found, f"environment read at import time (module: lines): {found}"


def test_every_module_starts_with_a_docstring():
    for name, tree in modules().items():
        first = tree.body[0] if tree.body else None
        assert (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str) and first.value.value.strip()), \
            f"{name}.py does not start with a docstring"
