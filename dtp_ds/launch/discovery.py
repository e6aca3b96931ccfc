"""Rank discovery: fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from whatever
started this process, before ``deepspeed.init_distributed`` (which then skips its own MPI
discovery).

Sources, first match wins:

1. a launcher that set all five (``deepspeed``, ``torchrun``): nothing to do;
2. MPI (``mpirun`` / ``mpiexec`` of Open MPI, MPICH/Hydra, MVAPICH, PMIx): ranks from mpi4py
   when it imports, else from the launcher's variables;
3. Slurm tasks (``srun``): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID.

Unlike DeepSpeed's own ``mpi_discovery`` (MASTER_ADDR from ``hostname -I``'s first address,
MASTER_PORT fixed at 29500), a MASTER_ADDR / MASTER_PORT already in the environment is kept;
otherwise the address is rank 0's host name (MPI) or the first node of SLURM_JOB_NODELIST, and
the port is derived from the Slurm job id (so jobs sharing a node do not collide) or 29500.
"""
from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from dtp_ds.cluster.ports import free_port

REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_PORT = 29500
_MPI_VARS = (  # (rank, size, local rank) per MPI flavour
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


class DiscoveryError(RuntimeError):
    """The environment names no rank, or names it incompletely; the message says what to set."""


def _mpi_env(env: MutableMapping[str, str]) -> tuple[str, str, str] | None:
    for rank, size, local in _MPI_VARS:
        if rank in env and (size in env or rank == "PMIX_RANK"):
            return rank, size, local
    return None


def _default_port(env: MutableMapping[str, str]) -> str:
    job = env.get("SLURM_JOB_ID", "")
    return str(20000 + int(job) % 20000) if job.isdigit() else str(DEFAULT_PORT)


def _from_mpi(env: MutableMapping[str, str], names: tuple[str, str, str]) -> tuple[dict[str, str], str]:
    try:
        from mpi4py import MPI
    except ImportError:
        MPI = None  # noqa: N806
    if MPI is not None:
        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        host = socket.gethostname()
        hosts = comm.allgather(host)
        local = sum(h == host for h in hosts[:rank])
        addr = env.get("MASTER_ADDR") or hosts[0]
        port = env.get("MASTER_PORT") or comm.bcast(_default_port(env), root=0)
        return ({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local), "MASTER_ADDR": addr,
                 "MASTER_PORT": port}, "MPI (mpi4py)")
    r, s, lr = names
    if s not in env:
        raise DiscoveryError(f"MPI launch ({r} set) without {s} and without mpi4py: install mpi4py")
    if "MASTER_ADDR" not in env:
        raise DiscoveryError("MPI launch without mpi4py: rank 0's address is unknown; export MASTER_ADDR "
                             "(e.g. mpirun -x MASTER_ADDR=$(hostname)) or install mpi4py")
    return ({"RANK": env[r], "WORLD_SIZE": env[s], "LOCAL_RANK": env.get(lr, "0"), "MASTER_ADDR": env["MASTER_ADDR"],
             "MASTER_PORT": env.get("MASTER_PORT") or _default_port(env)}, f"MPI ({r})")


def _from_slurm(env: MutableMapping[str, str]) -> tuple[dict[str, str], str]:
    addr = env.get("MASTER_ADDR")
    if not addr:
        from dtp_ds.launch.nodelist import expand_nodelist

        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodes:
            raise DiscoveryError("Slurm task without SLURM_JOB_NODELIST: export MASTER_ADDR")
        addr = expand_nodelist(nodes)[0]
    values = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
              "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "MASTER_ADDR": addr,
              "MASTER_PORT": env.get("MASTER_PORT") or _default_port(env)}
    return values, "Slurm (srun)"


def discover(env: MutableMapping[str, str] | None = None) -> str:
    """Set the five variables in ``env`` (default: os.environ); return where they came from.

    Raise DiscoveryError when no launcher can be recognised."""
    env = os.environ if env is None else env
    if all(k in env for k in REQUIRED):
        return "launcher (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT already set)"
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:  # torchrun-like, partial
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_PORT", _default_port(env))
        return "launcher (partial: LOCAL_RANK/MASTER_PORT defaulted)"
    names = _mpi_env(env)
    if names is not None:
        values, source = _from_mpi(env, names)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        values, source = _from_slurm(env)
    elif "RANK" not in env and "WORLD_SIZE" not in env:
        values, source = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                          "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
                          "MASTER_PORT": env.get("MASTER_PORT") or str(free_port())}, "single process"
    else:
        missing = [k for k in REQUIRED if k not in env]
        raise DiscoveryError(f"incomplete launch environment: {', '.join(missing)} unset and no MPI or Slurm "
                             f"task variables to derive them from")
    env.update(values)
    return source
