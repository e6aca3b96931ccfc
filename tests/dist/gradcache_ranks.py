"""GradCache against one large batch on real DeepSpeed engines. Run by tests/unit/test_gradcache.py
(one process) and tests/dist/test_gradcache.py (2 ranks under the deepspeed launcher, as a
``call`` of tests/dist/train_runs.py: :func:`run_cases`):

    python tests/dist/gradcache_ranks.py OUT CASE ...     CASE = KIND:MODEL:STAGE:PRECISION[:OPTION ...]

KIND ``large``: from the same weights, data and RNG state, two optimizer steps of
:class:`GradCacheStep` (micro-batch M, K chunks) and of one large batch of K x M per rank
(:class:`PlainStep`, no accumulation); ``plain``: the same against plain accumulation (K
micro-batches, each its own contrastive batch: the control that the comparison can tell);
``overflow``: an fp16 GradCache step whose second chunk's backward overflows, then a clean one.
A model that draws noise (``drip``: Gumbel boundaries, drop path, token dropout) has as its
large batch one forward of K x M whose trunk runs chunk by chunk (:class:`ChunkedBatch`), so
that it draws the noise GradCache's chunks draw, and one backward. OPTIONs: ``local``, the
contrastive loss with ``--local-loss --gather-with-grad``; ``ckpt``, activation checkpointing.
Rank 0 writes OUT/CASE.json (``:`` as ``_``).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile

import deepspeed
import open_clip
import torch
import torch.distributed as dist
from torch import nn

import dtp_ds  # noqa: F401  (registers the dtp_ds models with open_clip)
from dtp_ds.cluster.process_group import init_process_group
from dtp_ds.models import registry, trunks
from dtp_ds.models.seqcomp import SeqComp
from dtp_ds.tasks import param_groups
from dtp_ds.tasks.clip import CLIPModule
from dtp_ds.train.gradcache import GradCacheStep, split_batch
from dtp_ds.train.guard import NonFiniteGuard
from dtp_ds.train.metrics import loss_scale, param_fingerprints
from dtp_ds.train.precision import EMULATED_FP16_ENV, check_precision_supported
from dtp_ds.train.trainer import PlainStep

# plain SGD at a large step: a parameter moves by lr x its gradient (Adam's first step, about
# lr x sign(g), would turn the rounding of tiny gradients into differences of order lr)
MICRO, CHUNKS, STEPS, LR = 4, 3, 2, 0.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKEN_DROP = 0.25


NOISY_DRIP = "GC-DRIP-Tiny"


def noisy_drip_config() -> dict:
    """DRIP-ViT-Tiny-8-4x drawing every kind of noise: Gumbel-Sigmoid boundaries (the MLP
    predictor), drop path; token dropout is set on the trunk (:func:`noisy`)."""
    cfg = registry.load_config(registry.CONFIG_DIR / "DRIP-ViT-Tiny-8-4x.json")
    cfg["vision_cfg"]["trunk_cfg"]["drop_path_rate"] = 0.2
    cfg["vision_cfg"]["reducer_cfg"].update(predictor="mlp", predictor_input="tokens", selection="threshold",
                                            tied=False)
    return cfg


def noisy(model: nn.Module) -> nn.Module:
    for trunk in trunks(model):
        trunk.set_seqcomp(SeqComp(rate=TOKEN_DROP))
    return model


def create(model: str) -> nn.Module:
    """``vit``: ViT-Tiny-8 (no noise); ``drip``: the noisy DRIP (registered here)."""
    if model == "vit":
        return open_clip.create_model("ViT-Tiny-8", output_dict=True, nonscalar_logit_scale=True)
    registry.register_config(NOISY_DRIP, noisy_drip_config())
    return noisy(open_clip.create_model(NOISY_DRIP, output_dict=True, nonscalar_logit_scale=True))


class ChunkedBatch(nn.Module):
    """One large batch for a model that draws noise: a forward of K x M samples whose trunk
    runs chunk by chunk (drawing the noise in GradCache's order), the loss over every feature
    and the mean of the chunks' own losses, one backward."""

    def __init__(self, clip: CLIPModule, chunks: int) -> None:
        super().__init__()
        self.clip, self.chunks = clip, chunks

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encs = [self.clip(part, encode=True) for part in split_batch(batch, self.chunks)]
        batched = {n: torch.cat([e["batched"][n] for e in encs]) for n in encs[0]["batched"]}
        out = self.clip.coupled_loss(batched, encs[0]["shared"])
        if "own_loss" in encs[0]:
            out["loss"] = out["loss"] + torch.stack([e["own_loss"] for e in encs]).mean()
        return out


def build(model: str, stage: int, precision: str, micro: int, accum: int, chunked: bool, tmp: str,
          options: tuple[str, ...] = ()):
    torch.manual_seed(0)  # the same weights in every engine
    clip_model = create(model)
    clip_model.set_grad_checkpointing("ckpt" in options)
    local = "local" in options
    world = dist.get_world_size()
    module: nn.Module = CLIPModule(clip_model, dist.get_rank(), world, local_loss=local, gather_with_grad=local,
                                   input_dtype=DTYPES[precision])
    if chunked:
        module = ChunkedBatch(module, CHUNKS)
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
           "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True}
    if stage == 3:  # partition every parameter (the tiny model's all sit below the persistence threshold)
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0)
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if precision == "fp16":  # one overflow halves the scale (no hysteresis)
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "hysteresis": 1}
    optimizer = torch.optim.SGD(param_groups(module, 0.0), lr=LR)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=cfg)
    guard = NonFiniteGuard(engine, precision, 5, dist.get_rank(), tmp)
    return engine, guard


def batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    n = MICRO * CHUNKS
    return {"image": torch.rand(n, 3, 64, 64, generator=g), "text": torch.randint(1, 1000, (n, 32), generator=g)}


def params(engine) -> list[torch.Tensor]:
    out = []
    for p in engine.module.parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out.append(p.detach().double().cpu().clone())
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def train(stepper, steps: range, split: bool = False) -> list[float]:
    """The losses of ``steps`` (rank means); each step's batch and RNG state depend only on the
    step and the rank. ``split``: the batch goes to ``stepper`` as K micro-batches."""
    losses = []
    for step in steps:
        torch.manual_seed(10 + 100 * step + dist.get_rank())
        parts = split_batch(batch(step), CHUNKS) if split else [batch(step)]
        loss = sum(stepper(part, step)[0]["loss"].detach().double() for part in parts).reshape(1) / len(parts)
        dist.all_reduce(loss)
        losses.append(float(loss) / dist.get_world_size())
    return losses


def compare(kind: str, model: str, stage: int, precision: str, tmp: str, options: tuple[str, ...]) -> dict:
    gc_engine, gc_guard = build(model, stage, precision, MICRO, CHUNKS, False, tmp, options)
    start = params(gc_engine)
    gc = train(GradCacheStep(gc_engine, gc_engine.module, CHUNKS, gc_guard, torch.device("cpu")), range(1, STEPS + 1))
    if kind == "large":  # one batch of K x M per rank, no accumulation
        ref_engine, ref_guard = build(model, stage, precision, MICRO * CHUNKS, 1, model == "drip", tmp, options)
    else:  # plain accumulation: K micro-batches of M, each its own contrastive batch
        ref_engine, ref_guard = build(model, stage, precision, MICRO, CHUNKS, False, tmp, options)
    ref = train(PlainStep(ref_engine, ref_guard, torch.device("cpu")), range(1, STEPS + 1), split=kind == "plain")
    a, b = params(gc_engine), params(ref_engine)
    return {"loss_gradcache": gc, "loss_reference": ref, "max_diff": max_diff(a, b), "max_update": max_diff(b, start),
            "fingerprints": param_fingerprints(gc_engine, torch.device("cpu"))}


def overflow(model: str, stage: int, tmp: str) -> dict:
    """fp16: the second chunk's backward overflows in step 1; step 2 is clean."""
    os.environ[EMULATED_FP16_ENV] = "1"  # this CPU lacks native fp16: DeepSpeed's real fp16 engine, emulated kernels
    check_precision_supported("fp16")
    engine, guard = build(model, stage, "fp16", MICRO, CHUNKS, False, tmp)
    calls = {"grad": 0}

    def overflow_second_chunk(module, args, output):
        if torch.is_grad_enabled():
            calls["grad"] += 1
            if calls["grad"] == 2:
                output.register_hook(lambda g: torch.full_like(g, float("inf")))

    hook = engine.module.model.visual.register_forward_hook(overflow_second_chunk)
    stepper = GradCacheStep(engine, engine.module, CHUNKS, guard, torch.device("cpu"))
    before = params(engine)
    scale_before = loss_scale(engine)
    train(stepper, range(1, 2))
    hook.remove()
    after_skip = params(engine)
    seen = {"skipped_after_1": engine.skipped_steps, "scale_before": scale_before,
            "scale_after_1": loss_scale(engine), "changed_by_1": max_diff(after_skip, before)}
    train(stepper, range(2, 3))
    seen.update(skipped_after_2=engine.skipped_steps, changed_by_2=max_diff(params(engine), after_skip),
                finite=all(bool(torch.isfinite(p).all()) for p in params(engine)), grad_calls=calls["grad"])
    return seen


def main(out: str, cases: list[str]) -> None:
    init_process_group(dist_backend="gloo")
    run_cases(out, *cases)


def run_cases(out: str, *cases: str) -> None:
    """The CASEs on the process group that is up (also a ``call`` of tests/dist/train_runs.py)."""
    deepspeed.utils.logger.setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            kind, model, stage, precision, *options = case.split(":")
            if kind == "overflow":
                seen = overflow(model, int(stage), tmp)
            else:
                seen = compare(kind, model, int(stage), precision, tmp, tuple(options))
            if dist.get_rank() == 0:
                with open(os.path.join(out, case.replace(":", "_") + ".json"), "w") as f:
                    json.dump(seen, f)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
    main(args[0], args[1:])
