"""The package layout is the architecture: imports run one way, and the harness stays apart.

config -> fleet -> routing -> envoy_adapter -> app, with `harness` (simulator, stack, load
generator, demo, Envoy process helper, docs generator) beside them. A module may import its
own layer and the ones before it; product code never imports the harness, except the CLI's
`sim` and `demo` sub-commands, inside the function that runs them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "router_ext"
ORDER = ["config", "fleet", "routing", "envoy_adapter", "app", "harness"]
#: Generated gRPC code: a leaf that only the admin API (app) uses.
GENERATED = "api"
#: The one import against the flow, lazy and named: config validates `routing.profiles`
#: against the plugin registry while loading, so a typo is refused with its field path.
ALLOWED_LAZY = {("router_ext.config", "router_ext.routing")}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "router_ext" or len(parts) < 2:
        return None
    return parts[1]


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if name.startswith(f"router_ext.{GENERATED}"):
            continue
        out.append((name, path))
    return out


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top))
    return found


def test_every_module_is_in_a_layer() -> None:
    for name, _ in modules():
        if name == "router_ext":
            continue
        assert layer_of(name) in ORDER, f"{name} is in no layer: move it into one of {ORDER}"


def test_imports_run_one_way_and_product_code_never_imports_the_harness() -> None:
    wrong = []
    for name, path in modules():
        mine = layer_of(name)
        if mine is None or mine == "harness":
            continue
        for target, at_top in imports(path):
            theirs = layer_of(target)
            if theirs is None:
                continue
            if theirs == GENERATED:
                if mine != "app":
                    wrong.append(f"{name} imports generated {target} (only the admin API may)")
                continue
            if (name, target) in ALLOWED_LAZY and not at_top:
                continue
            if theirs == "harness":
                if name == "router_ext.app.cli" and not at_top:
                    continue  # `router-ext sim` / `demo`, loaded only when they run
                wrong.append(f"{name} imports the harness ({target})")
            elif ORDER.index(theirs) > ORDER.index(mine):
                wrong.append(f"{name} ({mine}) imports {target} ({theirs}): against the flow")
    assert wrong == []


def test_serve_loads_no_harness_module() -> None:
    # What `router-ext serve` imports: the CLI (parser without the harness commands' options)
    # and the server with everything it wires. gc.freeze() after start-up would otherwise
    # also freeze the simulator, the demo and the stack helper.
    code = (
        "import sys\n"
        "from router_ext.app import cli\n"
        "cli.build_parser(harness=False).parse_args(['serve'])\n"
        "import router_ext.app.server\n"
        "print(sorted(m for m in sys.modules if m.startswith('router_ext.harness')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_harness_commands_still_work_from_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "router_ext.app.cli", "sim", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "--pods" in out.stdout
    top = subprocess.run(
        [sys.executable, "-m", "router_ext.app.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "sim" in top.stdout and "demo" in top.stdout and "serve" in top.stdout
