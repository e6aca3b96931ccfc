"""Fast, single-process checks of the pieces under the engine: config resolution, batch
arithmetic, LR schedule, epoch planning, the data loader's resume position."""
from __future__ import annotations

import json
import re
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip_train.scheduler import cosine_lr

import dtp_ds  # noqa: F401  (registers the model configs)
from dtp_ds.data.shards import DataConfig, DataError, make_train_loader, plan_epoch, resolve_shards
from dtp_ds.tasks.clip import CaptionStage
from dtp_ds.train.args import ConfigError, parse_args
from dtp_ds.train.ds_config import load_ds_config, resolve, resolve_batch
from dtp_ds.train.schedule import check_resumed_lr, warmup_decay_lr
from tests.conftest import REPO, TINY_DS_CONFIG, train_data


def _args(*extra: str):
    return parse_args(["--deepspeed_config", TINY_DS_CONFIG, "--train-data", "x/{0..1}.tar", *extra])


def test_flags_win_and_are_recorded():
    raw = load_ds_config(TINY_DS_CONFIG)
    cfg, overrides = resolve(raw, _args("--batch-size", "8", "--precision", "fp16", "--lr", "1e-4",
                                        "--zero-stage", "3"), world_size=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["train_batch_size"] == 32
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0} and cfg["bf16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["optimizer"]["params"]["lr"] == 1e-4
    changed = {o["key"]: o for o in overrides}
    assert changed["train_micro_batch_size_per_gpu"] == {"key": "train_micro_batch_size_per_gpu", "ds_config": 64,
                                                         "flag": "--batch-size", "value": 8}
    assert changed["optimizer.params.lr"]["ds_config"] == 1e-3
    assert {"bf16.enabled", "fp16.enabled", "zero_optimization.stage"} <= set(changed)
    assert raw["bf16"]["enabled"] is True  # the loaded JSON itself is untouched


def test_the_reducer_loss_weight_flag_and_its_old_name():
    """--reducer-loss-weight weights every reducer's auxiliary losses; the old DRIP-only name is
    refused with the new one, never aliased."""
    assert _args("--reducer-loss-weight", "0.5").model.reducer_loss_weight == 0.5
    with pytest.raises(ConfigError, match="--boundary-loss-weight was renamed --reducer-loss-weight "
                                          r"\(it weights every token reducer's .*\): use --reducer-loss-weight$"):
        _args("--boundary-loss-weight", "0.5")


def test_no_flags_no_overrides_but_the_derived_total():
    cfg, overrides = resolve(load_ds_config(TINY_DS_CONFIG), _args(), world_size=2)
    assert [o["key"] for o in overrides] == ["train_batch_size"]
    assert cfg["train_batch_size"] == 128


def test_cpu_without_native_bf16_trains_fp32_unless_bf16_is_asked_for(caplog):
    """On an AVX2-only CPU a bf16 matmul is ~46x slower than fp32: the demo ran 30 s a step.
    The ds_config's bf16 becomes fp32 there (recorded as an override); --precision bf16 keeps
    it and warns; a CPU with native bf16, or a GPU, keeps the ds_config's."""
    raw = load_ds_config(TINY_DS_CONFIG)
    cfg, overrides = resolve(raw, _args(), world_size=2, cpu_bf16=False)
    assert cfg["bf16"]["enabled"] is False
    assert any(o["key"] == "bf16.enabled" and "native bf16" in o["flag"] for o in overrides)
    with caplog.at_level("WARNING"):
        cfg, _ = resolve(raw, _args("--precision", "bf16"), world_size=2, cpu_bf16=False)
    assert cfg["bf16"]["enabled"] is True and "tens of times slower" in caplog.text
    for cpu_bf16 in (True, None):
        assert resolve(raw, _args(), world_size=2, cpu_bf16=cpu_bf16)[0]["bf16"]["enabled"] is True


def test_batch_arithmetic_is_checked_against_world_size():
    raw = {"train_batch_size": 100, "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1}
    with pytest.raises(ConfigError, match="do not multiply out"):
        resolve_batch(raw, _args(), world_size=2)
    assert resolve_batch({"train_batch_size": 128, "gradient_accumulation_steps": 2}, _args(), 4) == (16, 2)
    with pytest.raises(ConfigError, match="not divisible"):
        resolve_batch({"train_batch_size": 100, "gradient_accumulation_steps": 3}, _args(), 4)


def test_accum_freq_makes_the_engines_accumulation_steps_gradcache_chunks():
    """--accum-freq K sets gradient_accumulation_steps to K (recorded) and makes them the chunks
    of one contrastive batch; a ds_config's own accumulation stays plain."""
    from dtp_ds.train.main import gradcache_on

    raw = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 2}
    cfg, overrides = resolve(raw, _args("--accum-freq", "4"), world_size=2)
    assert (cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (4, 128)
    assert {"key": "gradient_accumulation_steps", "ds_config": 2, "flag": "--accum-freq", "value": 4} in overrides
    assert gradcache_on(_args("--accum-freq", "4")) and not gradcache_on(_args()) and \
        not gradcache_on(_args("--accum-freq", "1"))
    with pytest.raises(ConfigError, match="--accum-freq 0: must be >= 1"):
        _args("--accum-freq", "0")


def test_bad_ds_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_ds_config(str(tmp_path / "nope.json"))
    (tmp_path / "broken.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(str(tmp_path / "broken.json"))


def test_every_shipped_ds_config_loads_and_resolves():
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        cfg, _ = resolve(load_ds_config(str(path)), _args(), world_size=2)
        assert cfg["train_batch_size"] == (cfg["train_micro_batch_size_per_gpu"]
                                           * cfg["gradient_accumulation_steps"] * 2), path


def test_schedule_matches_open_clip_and_survives_state_dict():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0}], lr=1e-3)
    sched = warmup_decay_lr(opt, warmup=10, total_steps=50)
    reference = cosine_lr(torch.optim.SGD(model.parameters(), lr=1e-3), 1e-3, 10, 50)
    for step in range(50):
        assert opt.param_groups[0]["lr"] == pytest.approx(reference(step), abs=1e-12)
        assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]
        if step == 30:
            state = json.loads(json.dumps(sched.state_dict()))
        sched.step()
    opt2 = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0}], lr=1e-3)
    sched2 = warmup_decay_lr(opt2, warmup=10, total_steps=50)
    sched2.load_state_dict(state)
    sched2.step()  # the first step after a resume: the saved curve, where it stopped
    assert opt2.param_groups[0]["lr"] == pytest.approx(reference(31), abs=1e-12)
    assert check_resumed_lr(sched2, 10, 1, 50) is None


def test_a_resume_that_would_change_the_lr_curve_names_the_flag():
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    sched = warmup_decay_lr(opt, warmup=10, total_steps=50, epochs=2)
    resumed = warmup_decay_lr(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3), 20, 80, 3)
    resumed.load_state_dict(sched.state_dict())  # the checkpoint's curve replaces the flags'
    assert (resumed.lr_lambdas[0].warmup, resumed.lr_lambdas[0].total_steps) == (10, 50)
    with pytest.raises(ValueError, match="--warmup 20 differs from the checkpoint's 10"):
        check_resumed_lr(resumed, 20, 2, 50)
    with pytest.raises(ValueError, match="--epochs 3 differs from the checkpoint's 2"):
        check_resumed_lr(resumed, 10, 3, 80)
    # the same flags at another world size: the saved curve goes on, and says so
    assert "the saved curve goes on" in check_resumed_lr(resumed, 10, 2, 100)


@pytest.mark.parametrize("n,micro,world,workers,accum", [(1000, 16, 2, 2, 1), (1000, 16, 2, 3, 4), (10, 64, 8, 4, 2)])
def test_epoch_plan_is_whole_steps_shared_by_workers(n, micro, world, workers, accum):
    plan = plan_epoch(n, micro, world, workers, accum)
    assert plan.num_samples >= n
    assert plan.batches_per_rank % accum == 0 and plan.batches_per_rank % workers == 0
    assert plan.batches_per_worker * workers == plan.batches_per_rank
    assert plan.num_samples == plan.batches_per_rank * micro * world


def test_missing_shards(synth):
    with pytest.raises(DataError, match="no shard matches"):
        resolve_shards(str(synth / "train" / "{90000..90003}.tar"))
    some, missing = resolve_shards(str(synth / "train" / "{00010..00013}.tar"))  # 00012, 00013 do not exist
    assert [p.rsplit("/", 1)[-1] for p in some] == ["00010.tar", "00011.tar"]
    assert [p.rsplit("/", 1)[-1] for p in missing] == ["00012.tar", "00013.tar"]


def _loader_texts(synth, batches_done: int, workers: int = 2, resampled: bool = False):
    cfg = DataConfig(train_data=train_data(synth), workers=workers, dataset_resampled=resampled)
    shards, _ = resolve_shards(cfg.train_data)
    plan = plan_epoch(2400, 16, 1, workers, 1)
    tok = open_clip.get_tokenizer("ViT-Tiny-8")
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-Tiny-8")
    loader = make_train_loader(cfg, shards, plan, CaptionStage(preprocess, tok), micro_batch=16, epoch=1, seed=0,
                               rank=0, world_size=1, batches_done=batches_done)
    return [texts for _, texts, _ in loader], plan


@pytest.mark.parametrize("resampled", [False, True])
def test_loader_resume_continues_the_epoch_exactly(synth, resampled):
    full, plan = _loader_texts(synth, 0, resampled=resampled)
    assert len(full) == plan.batches_per_rank
    resumed, _ = _loader_texts(synth, 5, resampled=resampled)  # odd position: the next batch comes from worker 1
    assert len(resumed) == len(full) - 5
    for a, b in zip(resumed, full[5:]):
        assert torch.equal(a, b)


def test_default_ds_config_follows_the_model_size():
    from dtp_ds.train.ds_config import default_ds_config

    assert default_ds_config("DRIP-ViT-Tiny-8-4x").endswith("ds_configs/tiny.json")
    assert default_ds_config("ViT-Tiny-8").endswith("ds_configs/tiny.json")
    with pytest.raises(ConfigError, match="pass --deepspeed_config"):
        default_ds_config("RN50")
    # every shipped name, whatever its reducer family, gets its trunk size's config (the shipped
    # files: the registry also holds what other tests and exports registered)
    from dtp_ds.models import CONFIG_DIR

    for name in sorted(p.stem for p in CONFIG_DIR.glob("*.json")):
        size, patch = re.search(r"ViT-([A-Za-z]+)-(\d+)", name).groups()
        want = "tiny.json" if size == "Tiny" else f"vit_{size.lower()}_{patch}.json"
        assert Path(default_ds_config(name)).name == want, name
    for path in sorted((REPO / "ds_configs").glob("vit_*_*.json")):  # every shipped size config is reachable
        parts = path.stem.split("_")
        if len(parts) != 3:  # variants (vit_b_32_fp16) are chosen explicitly
            continue
        size, patch = parts[1:]
        # ds_configs/ is a link to the package's dtp_ds/ds_configs/, which default_ds_config names
        assert Path(default_ds_config(f"DRIP-ViT-{size.upper()}-{patch}-10x")).resolve() == path.resolve()
        # without bf16 (V100s) the fp16 variant
        fp16 = Path(default_ds_config(f"ViT-{size.upper()}-{patch}", bf16=False))
        assert fp16.resolve() == path.resolve().with_name(path.stem + "_fp16.json")


def test_bf16_on_a_device_without_it_is_refused_naming_the_fp16_variant(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    from dtp_ds.train.precision import check_precision_supported

    monkeypatch.setattr(get_accelerator(), "is_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match=r"bf16 .* not supported .* fp16 variant"):
        check_precision_supported("bf16")
    check_precision_supported("fp32")


def test_param_groups_leave_gains_biases_embeddings_and_logit_scale_undecayed():
    import open_clip

    from dtp_ds.tasks import param_groups
    from dtp_ds.tasks.clip import CLIPModule

    task = CLIPModule(open_clip.create_model("DRIP-ViT-Tiny-8-4x", output_dict=True))
    no_decay, decay = param_groups(task, 0.1)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.1)
    names = {id(p): n for n, p in task.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    for name in ("model.token_embedding.weight", "model.positional_embedding", "model.logit_scale",
                 "model.visual.trunk.pos_embed", "model.visual.trunk.cls_token", "model.ln_final.weight",
                 "model.visual.trunk.norm.bias"):
        assert name in undecayed, name
    decayed = {names[id(p)] for p in decay["params"]}
    assert "model.text_projection" in decayed and "model.visual.trunk.blocks.0.attn.qkv.weight" in decayed
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(undecayed) + len(decayed) == sum(1 for _ in task.parameters())


def test_cli_defaults_are_the_dataclass_defaults():
    import dataclasses

    from dtp_ds.tasks import TASKS
    from dtp_ds.train.args import SECTIONS, build_parser

    parsed = vars(build_parser().parse_args([]))
    for section in (*SECTIONS, *(t.Config for t in TASKS.values())):  # every task's flags too
        for name, default in dataclasses.asdict(section()).items():
            assert parsed[name] == default, (section.__name__, name)


def test_epoch_end_save_and_evaluation_are_not_timed_as_the_next_step(monkeypatch):
    """The step timer restarts after the epoch end's save and evaluation (a fake clock: the save
    and the evaluation each take 100 s of it)."""
    from dtp_ds.train import trainer as trainer_mod
    from dtp_ds.train.checkpoint import TrainState

    clock = [1000.0]
    monkeypatch.setattr(trainer_mod.time, "time", lambda: clock[0])
    tr = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    tr.cfg = trainer_mod.TrainerConfig(run_dir="x", accum=1, global_batch=8, last_step=10, batches_per_epoch=2,
                                       log_every=1, save_every=0, keep_checkpoints=1, eval_every_epochs=1,
                                       eval_batch_size=8, eval_max_images=None, eval_workers=0, missing_shards=0)
    tr.state = TrainState(step=2, batches_in_epoch=2)
    done = []

    def slow(name):
        def run():
            clock[0] += 100.0
            done.append(name)
        return run

    tr.save, tr.evaluate = slow("save"), slow("evaluate")
    tr.restart_timer()
    tr.end_epoch(0)
    assert done == ["save", "evaluate"] and tr.state.epoch == 1 and tr.state.batches_in_epoch == 0
    assert tr.t_step == clock[0] == 1200.0
