"""Imports run one way (models <- data/eval <- tasks <- train <- autotune/bench/seqcomp <- the
entry modules dtp_ds.demo / dtp_ds.cli <- tools/), and the launch side starts without torch: read
from the sources with ``ast`` and from real imports."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PKG = REPO / "dtp_ds"
# (importing package, imported module prefix, why it is refused)
RULES = [
    ("models", "torch.distributed", "model code is single-device; cross-rank work lives in the loss"),
    ("models", "deepspeed", "model code is single-device"),
    ("models", "dtp_ds.", "models is the bottom layer (only dtp_ds.models itself)"),
    ("cluster", "dtp_ds.", "shared facts read by launch and autotune depend on nothing of dtp_ds"),
    ("data", "dtp_ds.autotune", "data sits below autotune"),
    ("data", "dtp_ds.train", "data sits below train"),
    ("eval", "dtp_ds.autotune", "eval sits below autotune"),
    ("eval", "dtp_ds.tasks", "eval sits below tasks"),
    ("eval", "dtp_ds.train", "eval sits below train"),
    ("data", "dtp_ds.tasks", "data sits below tasks"),
    ("tasks", "dtp_ds.train", "tasks sit below train"),
    ("tasks", "dtp_ds.autotune", "tasks sit below autotune"),
    ("train", "dtp_ds.autotune", "train sits below autotune (its start check reads only the memory model)"),
    ("train", "dtp_ds.bench", "train sits below bench"),
    ("train", "dtp_ds.seqcomp", "the seqcomp tools (costs, CA-MSE) sit above train; its schedule is train's"),
    ("launch", "dtp_ds.autotune", "launch and autotune share dtp_ds.cluster instead"),
    ("launch", "dtp_ds.train", "train imports launch (discovery, watchdog): launch sits below it"),
    ("autotune", "dtp_ds.launch", "launch and autotune share dtp_ds.cluster instead"),
]


# (importing package, imported module): the one way through a rule above, and why
EXCEPTIONS = {
    ("train", "dtp_ds.autotune.memory"): "the memory model is autotune's; train's start check predicts the peak "
                                         "with it (a leaf of autotune: test_the_memory_model_is_a_leaf_of_autotune)",
}

# Modules at the top of the package: its base, which every layer may import (IMPORT_ROOT, the
# model registration, the secret names), or an entry module, which nothing in the package imports.
TOP_BASE = {"dtp_ds", "dtp_ds.secrets"}
TOP_ENTRY = {
    "dtp_ds.demo": "make demo's run (the launch helpers it shares live in dtp_ds.train.runs)",
    "dtp_ds.cli": "entry points that hand the evaluation tools train's checkpoint reader",
}
TOOLS = REPO / "tools"


def console_scripts() -> dict[str, str]:
    """setup.py's ``CONSOLE_SCRIPTS``, read without running setup(): {name: "module:function"}."""
    tree = ast.parse((REPO / "setup.py").read_text())
    found = [n.value for n in tree.body if isinstance(n, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == "CONSOLE_SCRIPTS" for t in n.targets)]
    assert len(found) == 1, "setup.py must assign CONSOLE_SCRIPTS once (the dtp- commands)"
    return dict((part.strip() for part in line.split("=")) for line in ast.literal_eval(found[0]))


def tool_scripts() -> list[Path]:
    """The Python files of tools/: its scripts (no suffix, a python shebang) and the .py files below it."""
    scripts = [p for p in sorted(TOOLS.iterdir()) if p.is_file() and not p.suffix]
    return scripts + sorted(TOOLS.rglob("*.py"))


def dtp_ds_imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from dtp_ds... import name`` in ``path``; a plain ``import
    dtp_ds...`` as ``(module, "")``."""
    out: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name.split(".")[0] == "dtp_ds"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dtp_ds":
            out += [(node.module, a.name) for a in node.names]
    return out


def _imports(path: Path, source: str | None = None) -> set[str]:
    """Absolute names of every module ``path`` imports (anywhere in it, relative ones resolved);
    ``source``: its text, if not the file's."""
    parts = path.relative_to(REPO).with_suffix("").parts
    package = parts[:-1]  # the package a relative import starts from (also for __init__.py)
    out = set()
    text = path.read_text() if source is None else source
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.add(module)
            # ``from pkg import sub`` may import a submodule
            out |= {f"{module}.{a.name}" for a in node.names}
    return out


def _package_sources() -> dict[str, list[Path]]:
    by_pkg: dict[str, list[Path]] = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).parts
        by_pkg.setdefault(rel[0] if len(rel) > 1 else "", []).append(path)
    return by_pkg


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _refusals(pkg: str, path: Path, imported: set[str]) -> list[str]:
    """Why each of ``imported`` (the modules ``path``, of package ``pkg``, imports) runs upward."""
    own = f"dtp_ds.{pkg}"
    broken = [f"{path.relative_to(REPO)} imports {m}: {why}"
              for refused_pkg, refused, why in RULES if refused_pkg == pkg for m in sorted(imported)
              if (m == refused.rstrip(".") or m.startswith(refused)) and not m.startswith(own)
              and not any(p == pkg and (m == e or m.startswith(e + ".")) for p, e in EXCEPTIONS)]
    me = _module_name(path)
    broken += [f"{path.relative_to(REPO)} imports {m}: {entry} is an entry module ({why}); nothing in dtp_ds "
               f"imports it: move what is shared to the layer of its users" for entry, why in TOP_ENTRY.items()
               for m in sorted(imported) if (m == entry or m.startswith(entry + ".")) and me != entry]
    return broken


def test_imports_follow_the_layers():
    sources = _package_sources()
    assert {"models", "launch", "autotune", "eval", "train", "cluster", "tasks"} <= set(sources)
    broken = [b for pkg, paths in sources.items() for path in paths for b in _refusals(pkg, path, _imports(path))]
    assert not broken, "\n".join(broken)


def test_the_memory_model_is_a_leaf_of_autotune():
    """What train may import of autotune imports nothing else of autotune (the tuner, the probe)."""
    imported = _imports(PKG / "autotune" / "memory.py")
    assert not [m for m in imported if m.startswith("dtp_ds.autotune.")], imported
    assert not (PKG / "autotune" / "__init__.py").read_text().count("import"), "autotune/__init__.py imports nothing"


def test_every_top_level_module_is_the_base_or_an_entry_module():
    top = {_module_name(p) for p in PKG.glob("*.py")}
    assert top == TOP_BASE | set(TOP_ENTRY), (
        f"unclassified top-level modules {sorted(top - TOP_BASE - set(TOP_ENTRY))}: add each to TOP_BASE "
        f"(importable from every layer) or TOP_ENTRY (imported by nothing)")


def test_the_rules_refuse_the_old_upward_imports():
    """dtp_ds.train.lr_find and dtp_ds.bench.engine once took the launcher from the demo."""
    for pkg, name in (("train", "lr_find.py"), ("bench", "engine.py"), ("seqcomp", "demo.py")):
        path = PKG / pkg / name
        old = _imports(path, "def main():\n    from dtp_ds.demo import deepspeed_launcher\n")
        assert any("dtp_ds.demo is an entry module" in b for b in _refusals(pkg, path, old)), pkg
    launch = PKG / "launch" / "runs.py"
    assert _refusals("launch", launch, _imports(launch, "from dtp_ds.train.metrics import read_metrics\n"))


def test_tools_import_only_entry_points():
    """A tools/ script is a name for an entry function (setup.py's console scripts): the code it
    runs lives in the package, where the layering rules above see it."""
    entries = set(console_scripts().values())
    broken = [f"{p.relative_to(REPO)} imports {m}{':' + n if n else ''}" for p in tool_scripts()
              for m, n in dtp_ds_imports(p) if f"{m}:{n}" not in entries]
    assert not broken, ("tools/ scripts import only the entry functions in setup.py's CONSOLE_SCRIPTS (move the "
                        "code into dtp_ds, or add its entry function there):\n" + "\n".join(broken))


def test_only_train_imports_the_training_entry_point():
    offenders = [str(p.relative_to(REPO)) for pkg, paths in _package_sources().items() if pkg != "train"
                 for p in paths if any(m.startswith("dtp_ds.train.main") for m in _imports(p))]
    assert not offenders, f"import dtp_ds.train.main only from dtp_ds/train (shared pieces live beside it): {offenders}"


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_import_dtp_ds_launch_does_not_import_torch():
    p = _run("import dtp_ds.launch", "-X", "importtime")
    assert p.returncode == 0, p.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")]
    assert "dtp_ds.launch" in imported
    heavy = [m for m in imported if m.split(".")[0] in ("torch", "open_clip", "timm", "deepspeed", "numpy")]
    assert not heavy, f"import dtp_ds.launch imports {heavy[:5]}"


def test_make_hostfile_runs_without_torch_and_with_the_real_package(tmp_path):
    out = tmp_path / "hostfile"
    code = ("import json, runpy, sys\n"
            f"sys.argv = ['make_hostfile', '--nodelist', 'p[0201-0202]', '--gpus-per-node', '2', "
            f"'--partition', 'pitzer:gpuparallel-48core', '--out', {str(out)!r}]\n"
            "try:\n"
            f"    runpy.run_path({str(REPO / 'tools' / 'make_hostfile')!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    code = e.code\n"
            "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules, "
            "'dtp_ds': getattr(sys.modules['dtp_ds'], '__file__', None)}))")
    p = _run(code)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res == {"code": 0, "torch": False, "dtp_ds": str(PKG / "__init__.py")}, (res, p.stderr)
    assert out.read_text() == "p0201 slots=2\np0202 slots=2\n"


def test_import_dtp_ds_registers_the_models_once_open_clip_is_imported():
    # dtp_ds before open_clip (the hook); open_clip first is what most tests do in-process
    p = _run("import dtp_ds, sys; assert 'torch' not in sys.modules; import open_clip\n"
             "assert 'DRIP-ViT-Tiny-8-4x' in open_clip.list_models(); open_clip.create_model('DRIP-ViT-Tiny-8-4x')")
    assert p.returncode == 0, p.stderr[-2000:]
