"""The layering of README's "How it fits together": each module imports only from its own layer or
the ones before it, project imports sit at the top of modules, and no import cycle exists.

Parsed with `ast`, so nothing is imported; a new module must be placed in a layer here to pass.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("settings", "data_store", "retrain", "feedback", "serve", "app")

LAYERS: list[list[str]] = [
    ["settings"],
    ["data_store.errors", "data_store.text", "data_store.models", "data_store.db", "data_store.writer"],
    # The dataset stage and the run rows: pure functions and the store, nothing that serves.
    ["retrain.parse", "retrain.dataset", "retrain.examples", "retrain.importer", "retrain.resplit", "retrain.export",
     "retrain.gate", "retrain.runs"],
    ["feedback.fields", "feedback.curation", "feedback.record"],
    ["serve.model", "serve.client", "serve.vllm_server", "serve.vllm_lora_ops", "serve.adapters", "serve.fleet",
     "serve.zero_adapter", "serve.model_export", "serve.auth", "serve.identity", "serve.canary", "serve.chat", "serve.residency"],
    ["retrain.train", "retrain.evaluate", "retrain.cycle", "retrain.schedule"],
    ["serve.services"],  # the one composition root
    ["serve.app_client", "serve.api", "serve.chat_ui", "feedback.runs_ui", "feedback.canary_ui", "feedback.curation_ui",
     "serve.web"],
    ["app"],
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}
# The CLI imports the web layer (Gradio: seconds) only in the command that serves, so that
# `tuneloop keys list` and the like start fast.
LAZY = {("app", "serve.web")}


def modules() -> dict[str, Path]:
    found = {p.stem: p for p in ROOT.glob("*.py") if p.stem in PACKAGES}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).glob("*.py") if (ROOT / pkg).is_dir() else ():
            if p.stem != "__init__":
                found[f"{pkg}.{p.stem}"] = p
    return found


def project_imports(path: Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """(module imported, at the module's top level?, line) for every import of a project module."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from serve import adapters` names a module; `from serve.chat import Turn` names a module's member.
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        else:
            continue
        out += [(t, id(node) in top, node.lineno) for t in targets if t.split(".")[0] in PACKAGES]
    return out


def test_every_module_has_a_layer():
    assert not set(modules()) - set(LAYER), "place the new module in a layer of LAYERS (and README's table)"
    assert not set(LAYER) - set(modules()), "LAYERS names a module that no longer exists"


def test_imports_go_one_way_and_sit_at_the_top():
    mods = modules()
    wrong = []
    for name, path in mods.items():
        for target, at_top, line in project_imports(path, set(mods)):
            if target not in LAYER:
                wrong.append(f"{name}:{line} imports {target}, which is a package, not a module; import the module")
            elif LAYER[target] > LAYER[name]:
                wrong.append(f"{name}:{line} imports {target} from a later layer ({LAYER[target]} > {LAYER[name]})")
            elif not at_top and (name, target) not in LAZY:
                wrong.append(f"{name}:{line} imports {target} inside a function; project imports go at the top")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    mods = modules()
    graph = {name: {t for t, _, _ in project_imports(path, set(mods)) if t in mods and t != name} for name, path in mods.items()}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node not in done:
            for nxt in sorted(graph[node]):
                visit(nxt, stack + [node])
            done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_no_module_is_over_400_lines():
    files = [*modules().values(), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these by stage: {long}"
