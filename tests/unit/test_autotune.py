"""The batch-size tuner: memory model against autograd's saved tensors and DeepSpeed's
estimators, the users' Pitzer observations, the shipped ds_configs, job shapes, the CLI."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch.nn.attention import SDPBackend, sdpa_kernel

import dtp_ds  # noqa: F401
from dtp_ds.autotune.memory import (
    BlockDtypes,
    GiB,
    TrainSetup,
    activations_per_sample,
    block_bytes_per_token,
    check_start_memory,
    estimate,
    logits_bytes,
    max_micro_batch,
    model_shape,
    model_states,
    packed_block_bytes,
    predict_peak_gib,
)
from dtp_ds.autotune.tuner import main as tuner_main
from dtp_ds.autotune.tuner import tune
from dtp_ds.cluster.partitions import JobShapeError, check_job_shape, registry_partition, resolve_target
from dtp_ds.models import pinned_tokens
from dtp_ds.models.segments import make_packing, pack_segments, segment_ids
from dtp_ds.models.vit import Block
from dtp_ds.tasks.clip import CLIPModule
from dtp_ds.train.args import parse_args
from dtp_ds.train.ds_config import load_ds_config, resolve

REPO = Path(__file__).resolve().parents[2]
V100_16, V100_32, A100_80 = 15.78 * GiB, 31.75 * GiB, 79.15 * GiB


def _is_weight_copy(t: torch.Tensor, params: set[int]) -> bool:
    """autocast's 16-bit copy of a parameter (saved by the matmul that used it)."""
    fn = t.grad_fn
    while fn is not None and fn.name() in ("TBackward0", "TransposeBackward0", "ViewBackward0"):
        fn = fn.next_functions[0][0]  # the matmul saves a transposed view of the copy
    if fn is None or fn.name() != "ToCopyBackward0":
        return False
    src = fn.next_functions[0][0]
    return hasattr(src, "variable") and src.variable.untyped_storage().data_ptr() in params


def saved_bytes(fn, module: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs; parameters and
    autocast's weight copies (a per-model term, not an activation) are left out."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params and not _is_weight_copy(t, params):
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def model_of(stem: str) -> str:
    """ds_configs/vit_l_14_fp16.json -> ViT-L-14."""
    size, patch = stem.replace("_fp16", "").split("_")[1:]
    return f"ViT-{size.upper()}-{patch}"


# --- activations: one block, against autograd ------------------------------------------------
BLOCKS = {"open_clip": lambda h, n: ResidualAttentionBlock(h, n), "trunk": lambda h, n: Block(h, n)}


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("mode", ["fp32", "bf16", "amp"])
def test_block_activation_term_equals_autograd_saved_tensors(block, mode):
    h, heads, batch, tokens = 64, 4, 2, 17
    torch.manual_seed(0)
    blk = BLOCKS[block](h, heads)
    x = torch.randn(batch, tokens, h)
    if mode == "bf16":
        blk, x = blk.to(torch.bfloat16), x.to(torch.bfloat16)
    x.requires_grad_()

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "amp"):
            blk(x)

    measured = saved_bytes(run, blk)
    # amp: fp32 input (the text tower's stream); CPU LayerNorm saves its statistics in the
    # input dtype (CUDA: fp32), so bf16 runs use 2-byte statistics here.
    dt = {"fp32": BlockDtypes(4, 4), "bf16": BlockDtypes(2, 2), "amp": BlockDtypes(4, 2)}[mode]
    stat = 2 if mode == "bf16" else 4
    assert measured == batch * tokens * block_bytes_per_token(h, 4 * h, heads, dt, ln_stat_bytes=stat)


def test_math_attention_term_equals_autograd_saved_tensors():
    h, heads, batch, tokens = 64, 4, 2, 17
    blk = ResidualAttentionBlock(h, heads)
    x = torch.randn(batch, tokens, h, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):
        measured = saved_bytes(lambda: blk(x), blk)
    expected = block_bytes_per_token(h, 4 * h, heads, BlockDtypes(4, 4), attention="math", seq_len=tokens)
    assert measured == batch * tokens * expected


def test_packed_block_term_equals_autograd_saved_tensors():
    h, heads, batch, patches = 64, 4, 3, 24
    torch.manual_seed(1)
    hard = (torch.rand(batch, patches) < 0.3).float()
    packing = make_packing(segment_ids(hard))
    assert packing.padded  # unequal lengths: the padded attention layout is exercised
    x = pack_segments(torch.randn(batch, 1 + patches, h), packing).detach().requires_grad_()
    blk = Block(h, heads)
    measured = saved_bytes(lambda: blk(x, packing), blk)
    expected = packed_block_bytes(packing.num_rows / batch, packing.max_len, h, 4 * h, heads, BlockDtypes(4, 4))
    assert measured == pytest.approx(batch * expected, rel=1e-9)


@pytest.mark.parametrize("name", ["ViT-Tiny-8", "DRIP-ViT-Tiny-8-4x", "DRIP-ViT-Tiny-8-4x-up"])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "amp"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_whole_clip_activations_match_autograd(name, mode, ckpt):
    """The whole model and the loss, as CLIPModule runs them: within 7% (the small terms outside
    the blocks are modelled coarsely; the blocks exactly). Reducers are pinned to 16 tokens so
    the count is known."""
    batch = 8
    torch.manual_seed(0)
    model = open_clip.create_model(name, output_dict=True, nonscalar_logit_scale=True)
    model.set_grad_checkpointing(ckpt)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    model = model.to(dtype)
    task = CLIPModule(model, input_dtype=dtype)
    shape = model_shape(name)
    images = torch.randn(batch, 3, shape.image_size, shape.image_size)
    texts = torch.randint(0, 49408, (batch, shape.text.tokens))

    def run():
        with pinned_tokens(model, 16), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "amp"):
            task({"image": images, "text": texts})

    measured = saved_bytes(run, task)
    if shape.trunk is not None:  # pinned: 16 equal segments per sample (rate 15 / 63), no padding
        shape = model_shape(name, boundary_rate=15 / 63, padding_sigmas=0.0)
    setup = TrainSetup(setting="amp-ddp" if mode == "amp" else "deepspeed",
                       precision="fp32" if mode == "fp32" else "bf16", ckpt=ckpt, autocast_device="cpu")
    act = activations_per_sample(shape, setup, ln_stat_bytes=2 if mode == "bf16" else 4)
    predicted = batch * act.saved + logits_bytes(shape, setup, batch) / 2  # the saved half of the loss term
    assert predicted == pytest.approx(measured, rel=0.07)


def test_drip_compression_and_local_loss_shrink_the_prediction():
    su = TrainSetup(precision="bf16", world=8)
    vit, drip = model_shape("ViT-L-14"), model_shape("DRIP-ViT-L-14-10x")
    assert activations_per_sample(drip, su).saved < 0.4 * activations_per_sample(vit, su).saved
    # a checkpoint that learned a higher boundary rate costs more than the 10x prior
    assert activations_per_sample(model_shape("DRIP-ViT-L-14-10x", boundary_rate=0.3), su).saved > \
        activations_per_sample(drip, su).saved
    big = replace(su, world=64)
    assert logits_bytes(vit, replace(big, local_loss=True), 512) * 20 < logits_bytes(vit, big, 512)


@pytest.mark.parametrize("config,model", [("vit_b_32", "ViT-B-32"), ("vit_l_14", "ViT-L-14")])
def test_start_up_check_turns_on_the_local_loss_at_64_gpus(config, model):
    """The shipped configs' full contrastive loss needs about 100 GiB per GPU at 64 ranks: the
    start-up check turns on --local-loss --gather-with-grad (same gradients) and says so."""
    cfg = load_ds_config(str(REPO / "ds_configs" / f"{config}.json"))
    assert predict_peak_gib(model, cfg, None, 64) > 90
    changes, message = check_start_memory(model, cfg, None, 64, A100_80)
    assert changes == {"local_loss": True, "gather_with_grad": True}
    assert "--local-loss --gather-with-grad" in message and "same gradients" in message
    assert check_start_memory(model, cfg, None, 64, A100_80, local_loss=True, gather_with_grad=True) == ({}, None)
    assert check_start_memory(model, cfg, None, 8, A100_80) == ({}, None)  # fits at 8 ranks as it is
    with pytest.raises(ValueError, match="micro-batch of at most .*tools/autotune_batch"):
        check_start_memory(model, cfg, None, 64, V100_16)  # too small even with the local loss


# --- GradCache (--accum-freq) ----------------------------------------------------------------
def test_gradcache_memory_is_one_chunk_plus_the_whole_batchs_features_and_logits():
    """K chunks of m: the activations of m, the gradients kept across the chunks, the features
    of all K x m (cached, concatenated, their gradients) and, while the whole batch's loss runs
    between the passes (no activations alive then), its logits: below one batch of K x m."""
    shape = model_shape("ViT-B-32")
    su = TrainSetup(precision="bf16", stage=2, world=8)
    chunk, k = 256, 8
    gc = estimate(shape, replace(su, accum=k, gradcache=True), chunk)
    plain = estimate(shape, replace(su, accum=k), chunk)  # K separate contrastive batches of m x world
    whole = estimate(shape, su, chunk * k)  # one batch of K x m
    assert gc.phase == plain.phase == "forward/backward"
    # a chunk's forward/backward holds what plain accumulation's does, less its own logits
    # (the whole batch's come in a phase of their own), plus the features' gradients
    assert {**gc.components, "contrastive_logits": plain.components["contrastive_logits"], "feature_cache": 0,
            "fragmentation": 0} == {**plain.components, "feature_cache": 0, "fragmentation": 0}
    assert gc.components["feature_cache"] == 2 * chunk * k * shape.embed_dim * 2
    assert gc.peak < 0.5 * whole.peak
    # at 64 GPUs the whole batch's logits (K x m x 64)^2 outweigh a chunk's activations
    big = estimate(shape, replace(su, world=64, accum=k, gradcache=True), chunk)
    assert big.phase == "contrastive loss"
    assert big.components["contrastive_logits"] == logits_bytes(shape, replace(su, world=64), chunk * k)
    assert "activations" not in big.components and big.components["feature_cache"] == 3 * gc.components[
        "feature_cache"]


def test_start_up_check_knows_gradcaches_whole_batch_logits():
    """128 x 16 chunks on 64 GPUs: each chunk fits easily, the whole contrastive batch's
    (131072)^2 logits do not; the local loss (2048 rows) does."""
    cfg = {**load_ds_config(str(REPO / "ds_configs" / "vit_b_32.json")), "train_micro_batch_size_per_gpu": 128,
           "gradient_accumulation_steps": 16}
    assert check_start_memory("ViT-B-32", cfg, None, 64, A100_80) == ({}, None)  # 16 separate batches
    changes, message = check_start_memory("ViT-B-32", cfg, None, 64, A100_80, gradcache=True)
    assert changes == {"local_loss": True, "gather_with_grad": True}
    assert "16 GradCache chunks" in message and "--local-loss --gather-with-grad" in message


GRADCACHE_JOB = ["--model", "ViT-L-14", "--partition", "pitzer:gpuserial", "--global-batch", "1024", "--json"]


def test_the_tuner_offers_gradcache_where_the_global_batch_needs_accumulation():
    """ViT-L-14 on a 16 GB V100 at 1024: no setup holds it in one micro-batch. GradCache keeps
    the contrastive batch whole, so it beats plain accumulation (faster, but 8 batches of 128)
    unless --allow-accumulation; its ds_config and launch line train exactly that."""
    data = tune(GRADCACHE_JOB).data
    chosen = data["chosen"]
    assert chosen["gradcache"] and data["accum_freq"] == chosen["gradient_accumulation_steps"] > 1
    assert data["contrastive_batch"] == data["global_batch"] == 1024
    assert f"--accum-freq {data['accum_freq']}" in data["launch"]
    assert any("GradCache (--accum-freq" in n for n in data["notes"])
    plain = [c for c in data["candidates"] if not c["gradcache"] and c["predicted_samples_per_s"]]
    assert max(c["predicted_samples_per_s"] for c in plain) > chosen["predicted_samples_per_s"]
    assert all(c["peak_memory_gb"] <= 0.9 * 15.78 for c in data["candidates"] if c["micro_batch"])
    cfg, overrides = resolve(data["ds_config"], parse_args(["--train-data", "x.tar", "--accum-freq",
                                                            str(data["accum_freq"])]), 1)
    assert cfg["train_batch_size"] == 1024 and [o["key"] for o in overrides] == ["train_batch_size"]  # derived
    fast = tune([*GRADCACHE_JOB, "--allow-accumulation"]).data
    assert not fast["chosen"]["gradcache"] and fast["accum_freq"] is None
    assert fast["contrastive_batch"] == fast["micro_batch"] < 1024
    # where one micro-batch reaches the global batch, nothing accumulates and nothing is cached
    small = tune(["--model", "ViT-B-32", "--partition", "ascend:quad", "--global-batch", "512", "--json"]).data
    assert not any(c["gradcache"] for c in small["candidates"]) and small["contrastive_batch"] == 512


# --- model states: against DeepSpeed's own estimators ----------------------------------------
@pytest.mark.parametrize("world", [1, 8])
def test_zero2_states_are_deepspeeds_estimate_plus_the_step_temporaries(world):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = model_shape("ViT-L-14")
    P = shape.params
    _, step, _ = model_states(shape, TrainSetup(precision="bf16", stage=2, world=world))
    _, ds_gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=world, cpu_offload=False)
    ours = step["params"] + step["grads"] + step["optimizer"] + step["step_transient"]
    foreach_temp = 4 * P / world  # torch AdamW's sqrt(exp_avg_sq) over the fp32 partition
    assert ours - foreach_temp == pytest.approx(ds_gpu, rel=1e-6)

    _, step, host = model_states(shape, TrainSetup(precision="bf16", stage=2, offload="optimizer", world=world))
    _, ds_gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=world, cpu_offload=True)
    gpu = step["params"] + step["grads"]
    assert ds_gpu <= gpu <= ds_gpu + 4 * shape.largest_param  # + the fp32 staging buffer of one param
    assert host >= 16 * P / world


@pytest.mark.parametrize("world", [1, 8])
def test_zero3_states_are_deepspeeds_estimate_plus_grads_prefetch_and_step_temporaries(world):
    """DeepSpeed's stage-3 estimate (18 Psi / W + 4 x largest layer) leaves out the 16-bit
    gradient partition stage 3 allocates at start-up; we add it, the prefetch bucket and the
    optimizer step's temporaries."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape = model_shape("ViT-H-14")
    P = shape.params
    su = TrainSetup(precision="bf16", stage=3, world=world)
    _, step, _ = model_states(shape, su)
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(P, shape.largest_layer, num_gpus_per_node=world,
                                                         cpu_offload=False)
    ours = step["params"] + step["grads"] + step["optimizer"] + step["step_transient"]
    grad_partition = 2 * P / world
    assert ours - grad_partition - 4 * P / world - 2 * su.prefetch_bucket_size == pytest.approx(ds_gpu, rel=1e-6)


# --- the users' observations (CONTEXT.md, Pitzer V100s, open_clip's trainer) -------------------
# (model, GPUs, micro-batch per GPU, observed fit, the V100 the model says the run was on)
PITZER = [
    ("ViT-B-32", 1, 256, True, V100_16), ("ViT-B-32", 1, 512, False, V100_16),
    ("ViT-B-16", 1, 256, True, V100_32), ("ViT-B-16", 1, 512, False, V100_32),
    ("ViT-L-14", 1, 32, True, V100_16), ("ViT-L-14", 1, 64, False, V100_16),
    ("ViT-H-14", 1, 1, False, V100_16),
    ("ViT-L-14", 2, 20, True, V100_16), ("ViT-L-14", 2, 32, False, V100_16),
]


@pytest.mark.parametrize("name,gpus,micro,fits,mem", PITZER)
def test_every_pitzer_observation_is_reproduced(name, gpus, micro, fits, mem):
    est = estimate(model_shape(name), TrainSetup(setting="amp-ddp", precision="fp16", world=gpus), micro)
    assert (est.peak <= mem) == fits, est.table()


def test_which_v100_each_pitzer_run_landed_on():
    """Neither size alone explains the table: on 16 GB B-16 could not run 256, on 32 GB B-32
    512, L-14 64 and 2 x 32 would all have fitted. H-14 fits 32 GB at small batches."""
    amp = TrainSetup(setting="amp-ddp", precision="fp16")
    assert max_micro_batch(model_shape("ViT-B-16"), amp, V100_16) < 256
    assert max_micro_batch(model_shape("ViT-B-32"), amp, V100_32) >= 512
    assert max_micro_batch(model_shape("ViT-L-14"), amp, V100_32) >= 64
    assert max_micro_batch(model_shape("ViT-L-14"), replace(amp, world=2), V100_32) >= 32
    assert max_micro_batch(model_shape("ViT-H-14"), amp, V100_16) == 0
    assert max_micro_batch(model_shape("ViT-H-14"), amp, V100_32) >= 8


def test_two_gpus_fit_fewer_because_of_ddp_buckets_and_nccl():
    shape = model_shape("ViT-L-14")
    one = estimate(shape, TrainSetup(setting="amp-ddp", precision="fp16", world=1), 32)
    two = estimate(shape, TrainSetup(setting="amp-ddp", precision="fp16", world=2), 32)
    assert one.peak <= V100_16 < two.peak
    extra = {k: two.components[k] - one.components.get(k, 0.0) for k in two.components}
    assert extra["ddp_buckets"] == 4 * shape.params  # DDP's fp32 gradient buckets: a second copy
    assert extra["nccl"] > 0
    assert all(abs(v) < 0.01 * GiB for k, v in extra.items() if k not in ("ddp_buckets", "nccl", "fragmentation"))


# --- the shipped configs ----------------------------------------------------------------------
SHIPPED = sorted((REPO / "ds_configs").glob("vit_*.json"))


def test_every_model_size_has_a_bf16_and_an_fp16_config():
    names = {p.stem for p in SHIPPED}
    for size in ("b_32", "b_16", "l_14", "h_14"):
        assert {f"vit_{size}", f"vit_{size}_fp16"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
@pytest.mark.parametrize("world", [1, 2, 8])
def test_shipped_config_loads_in_deepspeed_at_world_size(path, world, monkeypatch):
    import deepspeed.runtime.config as ds_cfg
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg, _ = resolve(load_ds_config(str(path)), parse_args(["--train-data", "x.tar"]), world)
    assert cfg["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world
    # DeepSpeed checks the batch arithmetic against the data-parallel world size it sees
    monkeypatch.setattr(ds_cfg.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_cfg.dist, "get_world_size", lambda *a, **k: world)
    parsed = DeepSpeedConfig(cfg)
    assert parsed.train_batch_size == cfg["train_batch_size"]
    assert parsed.zero_optimization_stage == cfg["zero_optimization"]["stage"]
    if path.stem.endswith("_fp16"):
        assert parsed.float16_config.enabled and cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    else:
        assert parsed.bfloat16_config.enabled


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_is_what_the_tuner_writes(path):
    cfg = json.loads(path.read_text())
    argv = shlex.split(cfg["_tuned_by"]["command"])[1:]
    assert tune(argv).data["ds_config"] == cfg


def _shipped_setup(cfg: dict, world: int) -> TrainSetup:
    z = cfg["zero_optimization"]
    offload = "optimizer+param" if "offload_param" in z else "optimizer" if "offload_optimizer" in z else "none"
    return TrainSetup(precision="fp16" if cfg.get("fp16", {}).get("enabled") else "bf16", stage=z["stage"],
                      offload=offload, ckpt="activation_checkpointing" in cfg, world=world,
                      reduce_bucket_size=z.get("reduce_bucket_size", int(5e8)))


@pytest.mark.parametrize("stem,mem,target", [
    ("vit_h_14_fp16", V100_16, 32), ("vit_l_14", A100_80, 1024), ("vit_h_14", A100_80, 512)])
@pytest.mark.parametrize("world", [1, 2, 8])
def test_targets_with_the_shipped_configs(stem, mem, target, world):
    """ViT-H-14 on a 16 GB V100 at >= 32; ViT-L-14 >= 1024 and ViT-H-14 >= 512 on 80 GB, at the
    config's micro-batch, within the 10% margin, on one GPU and on 2 and 8."""
    cfg = json.loads((REPO / "ds_configs" / f"{stem}.json").read_text())
    micro = cfg["train_micro_batch_size_per_gpu"]
    assert micro >= target
    shape = model_shape(model_of(stem))
    est = estimate(shape, _shipped_setup(cfg, world), micro)
    assert est.peak <= 0.9 * mem, est.table()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_fits_its_gpu_on_one_and_eight_gpus(path):
    cfg = json.loads(path.read_text())
    mem = V100_16 if path.stem.endswith("_fp16") else A100_80
    shape = model_shape(model_of(path.stem))
    for world in (1, 8):
        assert estimate(shape, _shipped_setup(cfg, world), cfg["train_micro_batch_size_per_gpu"]).peak <= 0.9 * mem


# --- partitions and job shapes ----------------------------------------------------------------
@pytest.mark.parametrize("spec,nodes,gpus,rule,nearest", [
    ("pitzer:gpuserial", 1, 8, "exceeds the limit", "--nodes 1 --gpus-per-node 4"),
    ("pitzer:gpuserial", 2, 2, "max_nodes_per_job", "--nodes 1 --gpus-per-node 4"),
    ("pitzer:gpuparallel-48core", 4, 4, "node count", "--nodes 8 --gpus-per-node 2"),
    ("ascend:nextgen", 1, 4, "max_gpus_per_node", "--nodes 2 --gpus-per-node 2"),
])
def test_refused_job_shapes_name_the_rule_and_the_nearest_shape(spec, nodes, gpus, rule, nearest):
    with pytest.raises(JobShapeError) as e:
        check_job_shape(resolve_target(spec), nodes, gpus)
    assert rule in str(e.value) and nearest in str(e.value)


@pytest.mark.parametrize("nodes,gpus,lands_on", [
    # CONTEXT.md: gpuparallel-48core accepted 2 nodes x 2 GPUs, 2 x 4 and 4 x 2 (V100s): a 2-GPU
    # job may land on dual or quad nodes, a 4-GPU-per-node job only on the quad ones
    (2, 2, {"dual-v100-32g-48core", "quad-v100-32g-48core"}),
    (2, 4, {"quad-v100-32g-48core"}),
    (4, 2, {"dual-v100-32g-48core", "quad-v100-32g-48core"}),
])
def test_accepted_job_shapes_match_context(nodes, gpus, lands_on):
    part = resolve_target("pitzer:gpuparallel-48core")
    types = check_job_shape(part, nodes, gpus)
    assert {n.name for n in types} == lands_on
    assert all(n.gpus >= gpus and n.gpu.name.startswith("V100") for n in types)
    assert sum(n.nodes for n in types) >= nodes  # enough such nodes for one job


def test_registry_resolves_and_says_where_its_values_come_from():
    reg = json.loads((REPO / "dtp_ds" / "cluster" / "partitions.json").read_text())
    for cname, cluster in reg["clusters"].items():
        assert "_source" in cluster
        for pname, part in cluster.get("partitions", {}).items():
            assert "_source" in part and "_limits_source" in part
            assert registry_partition(cname, pname).node_types
        for node in cluster.get("node_types", {}).values():
            assert "_source" in node
    for gpu in reg["gpu_types"].values():
        assert "_source" in gpu
    mixed = registry_partition("pitzer", "gpuserial")
    assert check_job_shape(mixed, 1, 2)[0].gpu.mem_gib < 16  # 16 GB nodes take 2-GPU jobs
    assert {n.gpu.name for n in check_job_shape(mixed, 1, 4)} == {"V100-32GB"}  # only quad nodes have 4
    assert resolve_target("80GB").node_types[0].gpu.bf16 and not resolve_target("16").node_types[0].gpu.bf16
    assert resolve_target(None, 40).node_types[0].gpu.mem_gib == 40


# --- the command line -------------------------------------------------------------------------
def test_cli_json_schema_and_written_config(tmp_path):
    out = tmp_path / "cfg.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "autotune_batch"), "--model", "DRIP-ViT-B-32-10x",
                           "--partition", "pitzer:gpuparallel-48core", "--nodes", "2", "--gpus-per-node", "4",
                           "--global-batch", "4096", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env={"OMP_NUM_THREADS": "1",
                                                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    for key, kind in [("max_micro_batch", int), ("peak_memory_gb", float), ("ds_config", dict), ("micro_batch", int),
                      ("gradient_accumulation_steps", int), ("launch", str), ("candidates", list), ("target", dict)]:
        assert isinstance(data[key], kind), key
    assert data["target"]["world_size"] == 8 and data["target"]["gpu"] == "V100-32GB"
    assert data["data"]["reducer"]["type"] == "drip" and data["data"]["reducer"]["rate"] == 0.1
    assert data["micro_batch"] * data["gradient_accumulation_steps"] * 8 == 4096
    assert data["peak_memory_gb"] <= 0.9 * data["target"]["gpu_mem_gb"]
    assert json.loads(out.read_text()) == data["ds_config"]
    assert "--hostfile" in data["launch"] and "--num_nodes 2" in data["launch"] and str(out) in data["launch"]
    cfg, _ = resolve(data["ds_config"], parse_args(["--train-data", "x.tar"]), 8)
    assert cfg["train_batch_size"] == 4096


def test_cli_refuses_a_forbidden_shape_with_the_rule(capsys):
    assert tuner_main(["--model", "ViT-B-32", "--partition", "pitzer:gpuserial", "--gpus-per-node", "8",
                       "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert "exceeds the limit" in out["error"] and "--gpus-per-node 4" in out["error"]


def test_cli_amp_ddp_table_and_json(capsys):
    argv = ["--model", "ViT-L-14", "--partition", "pitzer:gpuserial", "--gpus-per-node", "2", "--setting",
            "amp-ddp", "--micro-batch", "20", "32"]
    assert tuner_main(argv) == 0
    table = capsys.readouterr().out
    assert "V100-16GB" in table and "-> OOM" in table and "-> fits" in table
    assert tuner_main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    checks = {c["micro_batch"]: c["fits"] for c in data["by_gpu_type"]["V100-16GB"]["checks"]}
    assert checks == {20: True, 32: False}
    assert data["ds_config"] is None and data["max_micro_batch"] >= 20 and data["peak_memory_gb"] > 0


def test_boundary_rate_from_a_run_directory(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i, "boundary_rate": 0.2}) for i in range(5)))
    data = tune(["--model", "DRIP-ViT-L-14-10x", "--gpu-mem", "80", "--boundary-rate", str(tmp_path), "--json"]).data
    assert data["data"]["reducer"]["rate"] == 0.2


def test_image_size_other_than_the_models_is_flagged():
    base = ["--model", "DRIP-ViT-B-32-10x", "--gpu-mem", "80", "--json"]
    notes = tune([*base, "--image-size", "336"]).data["notes"]
    assert any("model's own image size (224 px)" in n and "--image-size 336" in n for n in notes), notes
    for same in ([], ["--image-size", "224"]):
        assert not any("image size" in n for n in tune([*base, *same]).data["notes"])
