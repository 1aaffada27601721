"""The house rules of DESIGN §4, checked on the source: imports point down, no cycles, and the
config object is read only by the builder, the pipeline, the demo and the commands."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import sppdet

PKG = Path(sppdet.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every import in a module (top level and inside functions), as (absolute module, names)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            out.append((target, names))
            # "from . import build" imports the module sppdet.build
            out += [(f"{target}.{n}", []) for n in names if (PKG.parent / f"{target}.{n}".replace(".", "/")).exists()
                    or (PKG.parent / (f"{target}.{n}".replace(".", "/") + ".py")).exists()]
    return out


def _modules():
    return sorted(p for p in PKG.rglob("*.py"))


def _layer(module: str) -> str:
    """``sppdet.models.spp`` -> ``models``; ``sppdet.detect`` -> ``detect``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _in_layers(*layers: str):
    return [p for p in _modules() if _layer(_module_name(p)) in layers]


def test_model_feature_detect_and_evaluation_layers_never_import_train():
    offenders = []
    files = _in_layers("models", "features", "detect", "evaluation", "eval_checkpoint", "checkpoint", "build")
    assert len(files) > 10
    for p in files:
        for target, _ in _imports(p):
            if target == "sppdet.train" or target.startswith("sppdet.train."):
                offenders.append(f"{_module_name(p)} imports {target}")
    assert not offenders, offenders


def test_importing_test_time_code_loads_nothing_of_train():
    code = ("import sys, sppdet.detect, sppdet.eval_checkpoint, sppdet.features, sppdet.models.detector, "
            "sppdet.checkpoint, sppdet.build, sppdet.evaluation;"
            "from sppdet.build import detector_setup;"
            "print(sorted(m for m in sys.modules if m.startswith('sppdet.train')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=PKG.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def _layer_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for p in _modules():
        src = _layer(_module_name(p))
        for target, _ in _imports(p):
            if target.startswith("sppdet.") and _layer(target) and _layer(target) != src and src:
                graph[src].add(_layer(target))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []


def test_no_package_level_import_cycle():
    """Packages and top-level modules of sppdet (models/, features/, build, detect, ...) form a DAG,
    counting imports inside functions too."""
    graph = _layer_graph()
    assert {"models", "features", "build", "detect", "train"} <= set(graph)
    assert _cycles(graph) == []


#: Modules allowed to read the Config object (load it, merge it, look into its sections).
CONFIG_READERS = {"build", "train", "cli", "commands", "demo", "checkpoint", "config"}


def test_config_object_is_read_only_by_the_builder_pipeline_and_commands():
    offenders = []
    for p in _modules():
        layer = _layer(_module_name(p))
        if layer in CONFIG_READERS:
            continue
        for target, names in _imports(p):
            if target == "sppdet.config":
                bad = [n for n in names if n in ("Config", "load_config", "config_from_dict", "merge", "validate")]
                if bad:
                    offenders.append(f"{_module_name(p)} imports {', '.join(bad)} from sppdet.config")
        if ".cfg." in p.read_text(encoding="utf-8"):
            offenders.append(f"{_module_name(p)} reads a config object (.cfg.)")
    assert not offenders, offenders
