"""Entry points whose tool joins two layers: the evaluation tools (``dtp_ds.eval``) read
dtp_ds checkpoints with ``dtp_ds.train.export``, a layer above them, handed in here.

``tools/evaluate`` and ``tools/linear_probe`` call these, and so do their installed names
``dtp-evaluate`` and ``dtp-linear-probe`` (setup.py). Nothing in the package imports this module.
"""
from __future__ import annotations

from collections.abc import Sequence

from dtp_ds.eval import evaluate as _evaluate
from dtp_ds.eval import linear_probe as _linear_probe
from dtp_ds.train import export


def evaluate(argv: Sequence[str] | None = None) -> int:
    """``tools/evaluate``: :func:`dtp_ds.eval.evaluate.main` with the checkpoint reader."""
    return _evaluate.main(None if argv is None else list(argv), checkpoints=export)


def linear_probe(argv: Sequence[str] | None = None) -> int:
    """``tools/linear_probe``: :func:`dtp_ds.eval.linear_probe.main` with the checkpoint reader."""
    return _linear_probe.main(None if argv is None else list(argv), checkpoints=export)
