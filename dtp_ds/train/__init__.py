"""The DeepSpeed side of dtp_ds: task, DeepSpeed config resolution, checkpoints, metrics, the loop.

Run it as a module: ``deepspeed --num_gpus N --module dtp_ds.train --deepspeed_config ... ``.
"""
