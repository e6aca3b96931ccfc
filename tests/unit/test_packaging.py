"""A non-editable install works from any directory: partitions, the shipped ds_configs and the
model JSONs are package data, read from the installed copy rather than from a source tree; the
tools are on PATH as ``dtp-`` commands running the functions the tools/ scripts run."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.unit.test_layering import TOOLS, console_scripts, dtp_ds_imports

# tools/ scripts that are not installed: the checkout's own helpers
CHECKOUT_ONLY = {"ci_setup_ssh": "sets up sshd + pdsh for tests/e2e (apt-get, root): the CI's, not a user command"}
# tools/ scripts kept under an old name only to refuse it with the new one (not installed)
RENAMED_TOOLS = {"compression_costs": "seqcomp_costs", "compression_schedule": "seqcomp_schedule",
                 "bench_compression": "bench_seqcomp"}


def test_every_tool_is_installed_as_a_dtp_command_running_the_same_function():
    scripts = console_scripts()
    tools = {p.name: p for p in TOOLS.iterdir()
             if p.is_file() and not p.suffix and p.name not in {**CHECKOUT_ONLY, **RENAMED_TOOLS}}
    expected = {f"dtp-{name.replace('_', '-')}": name for name in tools}
    assert set(scripts) == set(expected), (
        f"setup.py CONSOLE_SCRIPTS: missing {sorted(set(expected) - set(scripts))}, "
        f"without a tools/ script {sorted(set(scripts) - set(expected))}")
    assert all(name.startswith("dtp-") for name in scripts)
    for command, tool in expected.items():
        imported = dtp_ds_imports(tools[tool])
        assert [f"{m}:{n}" for m, n in imported] == [scripts[command]], (
            f"tools/{tool} runs {imported}, {command} runs {scripts[command]}: one function for both")
        # called without arguments, as a console script calls it
        calls = [n for n in ast.walk(ast.parse(tools[tool].read_text())) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name) and n.func.id == "main"]
        assert calls and all(not c.args and not c.keywords for c in calls), f"tools/{tool}: main() takes no arguments"


def test_a_renamed_tool_refuses_its_old_name_with_the_new_one():
    for old, new in RENAMED_TOOLS.items():
        assert (TOOLS / new).is_file(), new
        p = subprocess.run([sys.executable, str(TOOLS / old), "--help"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and f"was renamed tools/{new}" in p.stderr and not p.stdout, (old, p)


def _install(tmp_path: Path) -> Path:
    """``pip install .`` (not editable) of a copy of the sources into a fresh target directory.
    The copy keeps pip's build folder out of the checkout."""
    src, target = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("dtp_ds",):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(src)], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    shutil.rmtree(src)  # nothing may be read from the copied sources either
    return target


@pytest.mark.run
def test_installed_package_reads_its_own_data_from_any_directory(tmp_path):
    site = _install(tmp_path)
    # A partition only the installed copy has: the tuner can only find it in the installed data.
    registry = site / "dtp_ds" / "cluster" / "partitions.json"
    reg = json.loads(registry.read_text())
    pitzer = reg["clusters"]["pitzer"]
    pitzer["partitions"]["installed-only"] = pitzer["partitions"]["gpuparallel-48core"]
    registry.write_text(json.dumps(reg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(site),
           "OMP_NUM_THREADS": "1"}

    def run(*argv: str) -> str:
        p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, cwd=elsewhere,
                           env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    assert sorted(p.name for p in (site / "bin").iterdir()) == sorted(console_scripts())
    out = json.loads(run(str(site / "bin" / "dtp-autotune-batch"), "--model", "DRIP-ViT-B-32-10x", "--partition",
                         "pitzer:installed-only", "--nodes", "2", "--gpus-per-node", "4", "--json"))
    assert out["target"]["partition"] == "pitzer:installed-only" and out["target"]["world_size"] == 8
    where = json.loads(run("-c", "import json, dtp_ds, open_clip\n"
                                 "from dtp_ds.train.ds_config import default_ds_config, load_ds_config\n"
                                 "path = default_ds_config('DRIP-ViT-B-32-10x')\n"
                                 "print(json.dumps({'pkg': dtp_ds.__file__, 'ds_config': path,\n"
                                 "  'micro': load_ds_config(path)['train_micro_batch_size_per_gpu'],\n"
                                 "  'model': 'DRIP-ViT-B-32-10x' in open_clip.list_models()}))"))
    shipped = json.loads((REPO / "ds_configs" / "vit_b_32.json").read_text())
    assert where == {"pkg": str(site / "dtp_ds" / "__init__.py"),
                     "ds_config": str(site / "dtp_ds" / "ds_configs" / "vit_b_32.json"),
                     "micro": shipped["train_micro_batch_size_per_gpu"], "model": True}
