"""The package's import graph: strict layers, no cycles, every module importable on its own.

Layers, bottom to top (a module imports only from its own layer or below, and the whole graph, function-local
imports included, has no cycle):

====  =========================================================================================================
0     ``errors``, ``compat``, ``files``, ``registry``, ``llm``, ``losses``, ``synthetic``, ``ray_runtime``,
      ``properties``: import nothing of ours but each other
1     formats and statistics: ``atomic``, ``stats``, ``checkpoint``, ``generation``, ``dataset_prep.itememb``,
      ``dataset_prep.item_text``, ``dataset_prep.pte_rewards``
2     ``config``
3     the prep base and converters: ``dataset_prep.hooks``, ``dataset_prep.amazon``, ``dataset_prep.sparsify``
4     ``data`` (datasets, feature tables; runs hooks found by name)
5     models: ``model.*``
6     ``evaluation``, ``trainer`` (finds a model's trainer by name)
7     ``quick_start`` (the one run path)
8     hook implementations and tools: ``dataset_prep.embed`` ... ``profiler_tuning``, ``analysis``, ``tune``,
      ``bench`` (hooks reach the data layer through entry points, never by import)
9     ``cli``
====  =========================================================================================================

Models import only models, ``data``, ``stats``, ``losses``, ``errors`` and the layer-0/1 utilities a model
needs (``checkpoint`` to read weights, ``llm`` to load a decoder, ``files``); never the trainer, a hook, the
config or the run path.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from typing import Dict, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "recbole_llmfuse"

LAYERS = {
    0: {"errors", "compat", "files", "registry", "llm", "losses", "synthetic", "ray_runtime", "properties"},
    1: {"atomic", "stats", "checkpoint", "generation", "dataset_prep.itememb", "dataset_prep.item_text",
        "dataset_prep.pte_rewards"},
    2: {"config"},
    3: {"dataset_prep", "dataset_prep.hooks", "dataset_prep.amazon", "dataset_prep.sparsify"},
    4: {"data"},
    5: {"model"},  # and every model.* module
    6: {"evaluation", "trainer"},
    7: {"quick_start"},
    8: {"dataset_prep.embed", "dataset_prep.encoder_lora", "dataset_prep.item_tokens", "dataset_prep.pretrained_ids",
        "dataset_prep.profiles", "dataset_prep.profiler_tuning", "analysis", "tune", "bench"},
    9: {"cli"},
}
MODEL_MAY_IMPORT = {"data", "stats", "losses", "errors", "files", "checkpoint", "llm"}


def _modules() -> Dict[str, str]:
    """``{short name: path}`` of every module (``model.pad``, ``dataset_prep.hooks``), as installed."""
    out = {}
    for folder, prefix in ((PACKAGE, ""), ("dataset_prep", "dataset_prep.")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))[:-3].replace(os.sep, ".")
                    name = prefix + rel
                    name = name[: -len(".__init__")] if name.endswith("__init__") else name
                    out[name or "__init__"] = os.path.join(dirpath, f)
    out["properties"] = os.path.join(ROOT, "properties", "__init__.py")
    return out


def _layer(name: str) -> int:
    if name == "model" or name.startswith("model."):
        return 5
    for layer, names in LAYERS.items():
        if name in names:
            return layer
    raise AssertionError(f"module {name} has no layer: add it to LAYERS in {__file__} (and to the table above)")


def _imports(path: str, modules) -> Dict[str, Set[str]]:
    """``{"top": {...}, "local": {...}}``: the package's modules this file imports (short names)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    top_nodes = {id(n) for n in tree.body}
    for n in tree.body:
        if isinstance(n, (ast.If, ast.Try)):
            top_nodes |= {id(m) for m in ast.walk(n)}
    found = {"top": set(), "local": set()}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for t in targets:
            if not (t == PACKAGE or t.startswith(PACKAGE + ".")):
                continue
            short = t[len(PACKAGE) + 1:]
            while short and short not in modules:  # `from pkg.mod import name`: the module, not the name
                short = short.rpartition(".")[0]
            if short:
                found["top" if id(node) in top_nodes else "local"].add(short)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return modules, {name: _imports(path, modules) for name, path in modules.items() if name != "__init__"}


def test_every_import_goes_down_the_layers_and_sits_at_module_level(graph):
    modules, imports = graph
    upward, local = [], []
    for name, found in imports.items():
        for target in found["top"] | found["local"]:
            if target != name and _layer(target) > _layer(name):
                upward.append(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
        local += [f"{name} imports {t} inside a function" for t in found["local"]]
    assert not upward, "\n".join(sorted(upward))
    assert not local, "\n".join(sorted(local))


def test_models_import_only_models_data_and_utilities(graph):
    _, imports = graph
    bad = [f"{name} imports {t}" for name, found in imports.items() if name == "model" or name.startswith("model.")
           for t in found["top"] if not (t.startswith("model") or t in MODEL_MAY_IMPORT)]
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycle(graph):
    _, imports = graph
    edges = {n: {t for t in f["top"] | f["local"] if t != n} for n, f in imports.items()}
    state: Dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_errors_have_one_base_the_cli_catches():
    import recbole_llmfuse
    from recbole_llmfuse import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) >= 12 and all(issubclass(c, recbole_llmfuse.LLMFuseError) for c in classes)
    raised_elsewhere = []
    for name, path in _modules().items():  # no error class is defined outside errors.py
        tree = ast.parse(open(path, encoding="utf-8").read())
        raised_elsewhere += [f"{name}.{n.name}" for n in tree.body if name != "errors" and isinstance(n, ast.ClassDef)
                             and any(getattr(b, "id", "").endswith(("Error", "Exception")) for b in n.bases)]
    assert raised_elsewhere == [], raised_elsewhere


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module imported first, in its own process (forked from one that holds only third-party libraries,
    so ~0.2 s each): an import order that only works after some other module was loaded fails here."""
    names = sorted(n for n in _modules() if n != "__init__")
    script = textwrap.dedent(f"""
        import importlib, os, sys, traceback
        import numpy, pandas, scipy.sparse, torch, yaml  # third-party only: nothing of ours is loaded
        assert not [m for m in sys.modules if m.startswith("{PACKAGE}")]
        failed = []
        for name in {names!r}:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    importlib.import_module("{PACKAGE}." + name)
                    code = 0
                except BaseException:
                    os.write(w, traceback.format_exc().encode()[-2000:])
                    code = 1
                os._exit(code)
            os.close(w)
            message = os.read(r, 4000).decode()
            os.close(r)
            if os.waitpid(pid, 0)[1] != 0:
                failed.append(name + ": " + message)
        print("\\n".join(failed) or "ok")
        sys.exit(1 if failed else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(ROOT))  # not the repository: the installed package is imported
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
