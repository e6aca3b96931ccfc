"""open_clip's own trainer with dtp_ds's model configs registered: the reference side of
tools/bench_engine, run under torchrun. Its arguments come in OPEN_CLIP_ARGS (a JSON list):
torchrun would take open_clip's ``--logs`` for an abbreviation of its own ``--logs-specs``.

One shim, for CPU only: open_clip_train wraps the model in
``DistributedDataParallel(model, device_ids=[device])``, which DDP refuses for CPU modules
(``device_ids`` must be None there); the wrapper below passes None on CPU and changes
nothing else.
"""
import json
import os
import sys

import torch
from open_clip_train import main as open_clip_main

import dtp_ds  # noqa: F401  (registers dtp_ds model names with open_clip)


class _DDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids=device_ids, **kwargs)


if __name__ == "__main__":
    open_clip_main.torch.nn.parallel.DistributedDataParallel = _DDP
    open_clip_main.main(json.loads(os.environ["OPEN_CLIP_ARGS"]) if "OPEN_CLIP_ARGS" in os.environ else sys.argv[1:])
