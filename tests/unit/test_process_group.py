"""One ninja for DeepSpeed's JIT-built CPU collective, whatever PATH a rank was started with: two
ninja versions take each other's builds for stale, and every launch would rebuild it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dtp_ds.cluster.process_group import use_interpreter_ninja

HERE = os.path.dirname(sys.executable)
needs_venv_ninja = pytest.mark.skipif(shutil.which("ninja", path=HERE) is None,
                                      reason="no ninja installed beside this interpreter (pip's ninja wheel)")


@needs_venv_ninja
def test_the_interpreters_ninja_goes_first_once(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    found = use_interpreter_ninja()
    assert found == shutil.which("ninja", path=HERE)
    assert os.environ["PATH"] == os.pathsep.join([HERE, "/usr/bin", "/bin"])
    assert shutil.which("ninja") == found
    use_interpreter_ninja()
    assert os.environ["PATH"].split(os.pathsep).count(HERE) == 1


@needs_venv_ninja
def test_loading_the_collective_from_another_path_does_not_rebuild_it():
    """A process started with the venv first on PATH loads (or builds) the op; one started with
    the system's PATH, where another ninja comes first, loads it without compiling: the build log
    gains no line."""
    load = ("import dtp_ds  # puts the interpreter's ninja first\n"
            "from deepspeed.accelerator import get_accelerator as g\n"
            "b = g().create_op_builder('ShareMemCommBuilder'); b and b.load()\n"
            "import torch.utils.cpp_extension as ce\n"
            "print(ce._get_build_directory('deepspeed_shm_comm', False))")
    system = "/usr/local/bin:/usr/bin:/bin"

    def run(path: str) -> Path:
        env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return Path(p.stdout.strip().splitlines()[-1])

    build = run(os.pathsep.join([HERE, system]))  # builds it if this machine never did
    log = (build / ".ninja_log").read_text()
    assert run(system) == build
    assert (build / ".ninja_log").read_text() == log, "the second load rebuilt DeepSpeed's CPU collective"
