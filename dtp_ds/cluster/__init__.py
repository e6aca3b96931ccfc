"""Facts about the machines that both ``dtp_ds.launch`` and ``dtp_ds.autotune`` read (partition
limits, a free local port), so neither imports the other. Standard library only at module
level: the hostfile tools import it on login nodes without torch."""
