"""Reuse a benchmark arm's finished run only when everything that shaped it is the same.

:func:`reuse_hash` is a sha256 over the arm's command line, the contents of every file it reads
(schedule, cost table, model JSON, ds_config: the names alone would let an edited file pass),
its thread settings, and the code revision (``git rev-parse HEAD`` plus a hash of ``dtp_ds/``'s
sources as they are, so editing the trainer retrains). :func:`reusable` / :func:`record` keep it in
the run directory's ``reuse.json`` beside ``metrics.jsonl``.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from dtp_ds.launch.probe import git_revision, source_hash

REPO = Path(__file__).resolve().parents[2]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
REUSE_FILE = "reuse.json"
# names the code revision instead of git (a copy without a checkout; a test that must not see
# other edits to the working tree while it runs)
REVISION_VAR = "DTP_DS_CODE_REVISION"


@lru_cache(maxsize=4)
def code_revision(repo: Path = REPO, package: str = "dtp_ds") -> str:
    """HEAD's commit and the hash of ``package``'s sources as they are, committed or not (the
    pre-flight's :func:`dtp_ds.launch.probe.source_hash`)."""
    return f"{git_revision(str(repo), short=False) or 'no git'}+{source_hash(str(repo), package)}"


def thread_settings(env: Mapping[str, str] | None = None, torch_threads: int | None = None) -> dict[str, str | None]:
    """The thread counts an arm runs with: the OpenMP / BLAS variables of its environment and,
    when given, torch's intra-op threads."""
    env = os.environ if env is None else env
    out: dict[str, str | None] = {k: env.get(k) for k in THREAD_VARS}
    if torch_threads is not None:
        out["torch_threads"] = str(torch_threads)
    return out


def reuse_hash(argv: Sequence[str], files: Iterable[str | os.PathLike[str]],
               threads: Mapping[str, str | None] | None = None, revision: str | None = None) -> str:
    """sha256 over ``argv``, each file's path and contents (a missing file hashes as missing),
    ``threads`` (default: :func:`thread_settings` of this process) and ``revision`` (default:
    ``$DTP_DS_CODE_REVISION``, else :func:`code_revision`)."""
    h = hashlib.sha256()
    h.update(json.dumps(list(argv)).encode())
    for f in sorted({os.fspath(f) for f in files}):
        h.update(b"\0file\0" + f.encode() + b"\0")
        h.update(Path(f).read_bytes() if os.path.isfile(f) else b"<missing>")
    h.update(json.dumps(dict(thread_settings() if threads is None else threads), sort_keys=True).encode())
    if revision is None:
        revision = os.environ.get(REVISION_VAR) or code_revision()
    h.update(revision.encode())
    return h.hexdigest()


def files_in(argv: Sequence[str], flags: Sequence[str] = ("--model", "--deepspeed_config", "--seqcomp-schedule",
                                                          "--seqcomp-costs", "--init-from")) -> list[str]:
    """The files a training command line names after ``flags`` (those that are files)."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in flags and os.path.isfile(argv[i + 1])]


def reusable(run_dir: str, digest: str) -> bool:
    """Whether ``run_dir`` recorded ``digest`` (:func:`record`) for its finished run."""
    path = os.path.join(run_dir, REUSE_FILE)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("hash") == digest


def record(run_dir: str, digest: str, **facts: object) -> None:
    with open(os.path.join(run_dir, REUSE_FILE), "w") as f:
        json.dump({"hash": digest, **facts}, f, indent=1)
