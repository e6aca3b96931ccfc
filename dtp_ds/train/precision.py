"""Training precisions: their torch dtypes and whether this device can run them. Its own module
so that the tuner's probe reads them without importing the training entry point."""
from __future__ import annotations

import os

import torch
from deepspeed.accelerator import get_accelerator

from dtp_ds.train.args import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EMULATED_FP16_ENV = "DTP_DS_ALLOW_EMULATED_FP16"


def check_precision_supported(precision: str) -> None:
    """DeepSpeed refuses fp16 on CPUs without native fp16 (AVX512-FP16 / AMX-FP16) with a
    bare message; say what to do instead. The env switch lifts only that capability gate:
    the real fp16 engine and its dynamic loss scaler then run with emulated fp16 kernels
    (slow; how the CPU test suite covers fp16)."""
    acc = get_accelerator()
    if precision == "bf16" and not acc.is_bf16_supported():
        raise ConfigError(f"bf16 (from --precision or the ds_config) is not supported on this {acc.device_name()} "
                          f"device (a V100 has none): use the config's fp16 variant (ds_configs/*_fp16.json) "
                          f"or --precision fp16")
    if precision != "fp16" or acc.is_fp16_supported():
        return
    if os.environ.get(EMULATED_FP16_ENV) == "1":
        acc.is_fp16_supported = lambda: True
        return
    raise ConfigError(f"fp16 (from --precision or the ds_config) is not supported on this {acc.device_name()} "
                      f"device: use bf16 or fp32 here and fp16 on GPUs without bf16 (V100), or set "
                      f"{EMULATED_FP16_ENV}=1 to run it emulated (slow)")
