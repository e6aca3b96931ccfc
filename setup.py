from pathlib import Path

from setuptools import find_packages, setup

# Every tools/ script's entry function on PATH under a dtp- name: tools/NAME -> dtp-NAME with "_"
# as "-" (tools/ci_setup_ssh, the CI's sshd set-up, stays in the checkout);
# tests/unit/test_packaging.py checks that each tools/ script calls the function its name runs.
CONSOLE_SCRIPTS = [
    "dtp-autotune-batch = dtp_ds.autotune.tuner:main",
    "dtp-bench = dtp_ds.bench.train_step:main",
    "dtp-bench-engine = dtp_ds.bench.engine:main",
    "dtp-bench-seqcomp = dtp_ds.seqcomp.bench:main",
    "dtp-boundary-ablation = dtp_ds.bench.boundary_ablation:main",
    "dtp-compare-reducers = dtp_ds.bench.compare_reducers:main",
    "dtp-evaluate = dtp_ds.cli:evaluate",
    "dtp-export-checkpoint = dtp_ds.train.export:main",
    "dtp-flops = dtp_ds.eval.flops:main",
    "dtp-get-data = dtp_ds.data.get_data:main",
    "dtp-gpu-check = dtp_ds.bench.gpu_check:main",
    "dtp-linear-probe = dtp_ds.cli:linear_probe",
    "dtp-lr-find = dtp_ds.train.lr_find:main",
    "dtp-make-hostfile = dtp_ds.launch.hostfile:main",
    "dtp-make-synthetic-shards = dtp_ds.data.synthetic:main",
    "dtp-prepare-imagenet = dtp_ds.data.imagenet:main",
    "dtp-seqcomp-costs = dtp_ds.seqcomp.costs:main",
    "dtp-seqcomp-schedule = dtp_ds.seqcomp.camse:main",
    "dtp-size-configs = dtp_ds.eval.size_configs:main",
    "dtp-visualize-boundaries = dtp_ds.train.visualize:main",
]

# Versions live in requirements.txt; the Makefile installs them in the order this
# machine needs (torch first, then the rest without build isolation).
setup(
    name="dtp_ds",
    version="0.1.0",
    description="CLIP pretraining with DRIP (dynamic-token-pooling) vision encoders under DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text() if Path("README.md").exists() else "",
    packages=find_packages(include=["dtp_ds", "dtp_ds.*"]),
    # read through importlib.resources; the checkout's ds_configs/ is a link to dtp_ds/ds_configs/
    package_data={"dtp_ds": ["models/configs/*.json", "ds_configs/*.json", "ds_configs/README.md",
                             "cluster/partitions.json"]},
    python_requires=">=3.10",
    extras_require={"data": ["img2dataset"]},  # tools/get_data only, not a training dependency
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
