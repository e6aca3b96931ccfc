"""The ds_config's ``activation_checkpointing`` section turns per-block checkpointing on (inputs
kept on the device) and nothing else: each DeepSpeed option that asks for more is refused by
name, with the fix, where the config is read (the trainer, the memory model), not ignored."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtp_ds.autotune.memory import setup_from_ds_config
from dtp_ds.train.args import ConfigError
from dtp_ds.train.ds_config import CHECKPOINTING_OPTIONS, load_ds_config, shipped_ds_config

SHIPPED = sorted(Path(shipped_ds_config("tiny.json")).parent.glob("*.json"))
# a value that asks for the option, per key
ON = {"partition_activations": True, "cpu_checkpointing": True, "contiguous_memory_optimization": True,
      "number_checkpoints": 4, "synchronize_checkpoint_boundary": True, "profile": True}


def _write(tmp_path: Path, section: object) -> str:
    cfg = json.loads(Path(shipped_ds_config("tiny.json")).read_text())
    cfg["activation_checkpointing"] = section
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_every_deepspeed_option_has_a_refusal():
    assert set(ON) == set(CHECKPOINTING_OPTIONS)


@pytest.mark.parametrize("key", sorted(ON))
def test_an_option_that_asks_for_something_is_refused_by_name(tmp_path, key):
    path = _write(tmp_path, {key: ON[key]})
    with pytest.raises(ConfigError) as e:
        load_ds_config(path)
    msg = str(e.value)
    assert f"--deepspeed_config {path}" in msg and f"activation_checkpointing.{key} is {json.dumps(ON[key])}" in msg
    assert ("set it to null" if key == "number_checkpoints" else "set it to false") in msg
    with pytest.raises(ConfigError, match=f"activation_checkpointing.{key}"):
        setup_from_ds_config(json.loads(Path(path).read_text()), world=1)


def test_cpu_checkpointing_names_what_fits_a_tower_instead(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_ds_config(_write(tmp_path, {"cpu_checkpointing": True, "partition_activations": True}))
    msg = str(e.value)
    assert "cpu_checkpointing" in msg and "partition_activations" in msg  # every one named at once
    assert "train_micro_batch_size_per_gpu" in msg and "--accum-freq" in msg and "tools/autotune_batch" in msg


def test_off_options_and_an_empty_section_turn_checkpointing_on(tmp_path):
    off = {k: (None if k == "number_checkpoints" else False) for k in ON}
    for section in ({}, off):
        cfg = load_ds_config(_write(tmp_path, section))
        assert setup_from_ds_config(cfg, world=1).ckpt


@pytest.mark.parametrize("section", [{"cpu_offload": True}, True, []])
def test_an_unknown_key_or_a_section_that_is_not_an_object_is_refused(tmp_path, section):
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        load_ds_config(_write(tmp_path, section))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_ds_config_loads(path):
    cfg = load_ds_config(str(path))
    assert setup_from_ds_config(cfg, world=1).ckpt == ("activation_checkpointing" in cfg)
