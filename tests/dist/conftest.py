"""Runs of several test modules in one launch: each ``deepspeed`` launch costs its launcher, its
imports and its process group (about 14 CPU seconds on the development CPU) before any step."""
from __future__ import annotations

import pytest

from tests.conftest import RunResult, run_many


@pytest.fixture(scope="session")
def shared_launch(synth, tmp_path_factory) -> dict[str, RunResult]:
    """The 2-rank runs of tests/dist/test_reducer_protocol.py and test_seqcomp_schedule.py (their
    ``planned_runs``, names distinct), trained one after another in one launch; each module
    asserts on its own runs."""
    from tests.dist import test_reducer_protocol, test_seqcomp_schedule

    logs = tmp_path_factory.mktemp("shared_launch")
    todo = test_reducer_protocol.planned_runs(synth, logs)
    for name, argv in test_seqcomp_schedule.planned_runs(synth, logs).items():
        assert name not in todo, name
        todo[name] = argv
    return run_many(todo, logs / "launch")
