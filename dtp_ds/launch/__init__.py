"""Multi-node launch: hostfiles from Slurm/PBS allocations, partition limits, the
``.deepspeed_env`` file, rank discovery (env, Slurm, MPI), a peer watchdog, and the pre-flight
check (``python -m dtp_ds.launch.check --hostfile F``).

Nothing here imports torch at module level except the watchdog and the probe, so the
hostfile tools start fast on a login node.
"""
from dtp_ds.launch.hostnames import HostnameError, validate_hostname
from dtp_ds.launch.nodelist import NodeListError, expand_nodelist

__all__ = ["HostnameError", "NodeListError", "expand_nodelist", "validate_hostname"]
