from pathlib import Path

from setuptools import find_packages, setup

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
    scripts=[str(p) for p in sorted(Path("tools").glob("*")) if p.is_file() and not p.suffix],
)
