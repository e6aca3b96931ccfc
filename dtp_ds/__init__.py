"""dtp_ds: CLIP pretraining with DRIP (dynamic-token-pooling) vision encoders under DeepSpeed.

``import dtp_ds`` makes every dtp_ds model config available to open_clip, so
``open_clip.create_model("DRIP-ViT-B-32-10x")`` works after it, without making
``import dtp_ds.launch`` (login nodes, hostfile tools) pay for torch.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
from typing import Any

__version__ = "0.1.0"
__all__ = ["IMPORT_ROOT", "__version__", "create_model", "list_models"]

# DeepSpeed JIT-builds its CPU ops with whichever ninja PATH finds first, and two ninja versions
# rebuild each other's builds (a minute or more each time): every process that imports dtp_ds,
# however it was started, uses the interpreter's own (dtp_ds.cluster.process_group).
from dtp_ds.cluster.process_group import use_interpreter_ninja  # noqa: E402

use_interpreter_ninja()

# The directory dtp_ds is imported from (a checkout, or site-packages of an install): child
# processes and remote hosts put it on PYTHONPATH to run this same code.
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _RegisterAfterOpenClip(importlib.abc.MetaPathFinder):
    """Registers the configs right after open_clip is first imported (a one-shot post-import hook).

    Registration needs open_clip, hence torch; importing them here would put torch under
    ``import dtp_ds.launch``. Nobody can call open_clip before importing it, so registering when
    that import finishes is as good as registering now. The hook runs ``import dtp_ds.models``,
    whose registry registers the shipped configs on import: if open_clip's import came from that
    registry itself, the (partial) module is returned and registers once it finishes."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "open_clip":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, exec_module = spec.loader, spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            del loader.exec_module  # back to the loader's own method
            importlib.import_module("dtp_ds.models")

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "open_clip" in sys.modules:
    importlib.import_module("dtp_ds.models")
elif not any(isinstance(f, _RegisterAfterOpenClip) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterOpenClip())


def __getattr__(name: str) -> Any:
    # dtp_ds.create_model / dtp_ds.list_models without importing torch up front.
    if name in ("create_model", "list_models"):
        return getattr(importlib.import_module("dtp_ds.models"), name)
    raise AttributeError(f"module 'dtp_ds' has no attribute {name!r}")
