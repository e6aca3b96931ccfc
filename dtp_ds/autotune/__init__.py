"""Batch-size tuning: a memory model of CLIP training, an OOM probe, and
the tuner behind ``tools/autotune_batch``."""
