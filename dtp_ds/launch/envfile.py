"""The ``.deepspeed_env`` file: the environment every node of a ``deepspeed --hostfile`` job
gets (DeepSpeed's pdsh runner reads it on the launching node and prepends ``export K=V;`` to
the command it runs over ssh on every node).

Point DeepSpeed at a file of the run's own with ``DS_ENV_FILE=/abs/path`` (an absolute name
wins over ``~`` and ``.`` in DeepSpeed's lookup), so concurrent jobs from one checkout do not
share ``./.deepspeed_env``. Rules enforced here, each refusal naming it:

- names are shell identifiers; values use only ``[A-Za-z0-9_@%+=:,./-]`` (no spaces: DeepSpeed
  wraps other values in double quotes, where ``$`` and backquotes would still run, and
  tools/slurm/common.sh sources the file for srun and mpirun);
- no secrets: the exports travel on the pdsh command line, readable in ``ps`` on every node
  (wandb keys belong in ``~/.netrc`` via ``wandb login``);
- one ``K=V`` per line, no comments or blank lines (DeepSpeed's reader splits every line on ``=``).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

from dtp_ds.secrets import is_secret_name

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VALUE = re.compile(r"[\w@%+=:,./-]*", re.ASCII)
# what a node's non-interactive ssh shell lacks (modules are not loaded there) and what NCCL needs
PASS_THROUGH = ("PATH", "LD_LIBRARY_PATH", "CUDA_HOME", "PYTHONPATH", "OMP_NUM_THREADS", "WANDB_MODE",
                "WANDB_DIR", "HF_HOME", "TORCH_HOME", "TRITON_CACHE_DIR", "GLOO_SOCKET_IFNAME")
PASS_PREFIXES = ("NCCL_", "TORCH_NCCL_", "UCX_")
DEFAULTS = {
    "NCCL_DEBUG": "WARN",
    # an NCCL error or timeout aborts the process instead of leaving it waiting
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "WANDB_MODE": "offline",
    "PYTHONUNBUFFERED": "1",
}


class EnvFileError(ValueError):
    """A variable was refused; the message names the rule."""


def check_var(name: str, value: str) -> None:
    """Raise EnvFileError unless ``name=value`` may go into ``.deepspeed_env``."""
    if not _NAME.fullmatch(name):
        raise EnvFileError(f"variable name '{name}' is not a shell identifier")
    if is_secret_name(name):
        raise EnvFileError(f"{name} looks like a secret: .deepspeed_env exports travel on the pdsh command line "
                           f"and show in 'ps' on every node (log in once instead, e.g. 'wandb login')")
    if not _VALUE.fullmatch(value):
        bad = sorted({c for c in value if not _VALUE.fullmatch(c)})
        raise EnvFileError(f"{name}: character{'s' if len(bad) > 1 else ''} {' '.join(repr(c) for c in bad)} "
                           f"not allowed in a .deepspeed_env value (the remote shell would interpret it)")


def collect(env: Mapping[str, str] | None = None, repo: str | None = None,
            extra: Mapping[str, str] | None = None, pass_through: Iterable[str] = PASS_THROUGH) -> dict[str, str]:
    """The variables to export: defaults, then the pass-through ones from ``env`` (secrets are
    skipped there, not refused), the repo on PYTHONPATH, then ``extra`` (checked strictly)."""
    env = os.environ if env is None else env
    out = dict(DEFAULTS)
    for k, v in env.items():
        if k in pass_through or k.startswith(PASS_PREFIXES):
            if is_secret_name(k):
                continue
            out[k] = v
    if repo:
        parts = [repo] + [p for p in out.get("PYTHONPATH", "").split(":") if p and p != repo]
        out["PYTHONPATH"] = ":".join(parts)
    out.update(extra or {})
    for k, v in out.items():
        check_var(k, v)
    return out


def format_env(variables: Mapping[str, str]) -> str:
    """``K=V`` lines, each checked."""
    for k, v in variables.items():
        check_var(k, v)
    return "".join(f"{k}={v}\n" for k, v in variables.items())


def write_env(path: str, variables: Mapping[str, str]) -> None:
    """Write (atomically) a file DeepSpeed reads with ``DS_ENV_FILE=path``."""
    text = format_env(variables)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """``['K=V', ...]`` -> dict; a missing ``=`` is refused."""
    out = {}
    for item in items:
        if "=" not in item:
            raise EnvFileError(f"--env '{item}': expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    return out
