"""Per-GPU peak memory of CLIP training, from the model config and the training setup.

    peak = CUDA context [+ NCCL when world > 1]
           + (1 + fragmentation) x max(peak at the start of backward, peak in the optimizer step
                                       [, GradCache: peak of the whole batch's contrastive loss])

Model states (bytes per parameter, Psi parameters, W data-parallel ranks) follow the ZeRO paper
(Rajbhandari et al. 2020) and DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs``
and ``estimate_zero3_...``: 2 Psi + 18 Psi / W for ZeRO-2), plus what the optimizer step
allocates on top (the fp32 gradient partition, torch AdamW's foreach temporaries) and the
communication buffers (DDP's gradient buckets, DeepSpeed's reduce buckets). Activations are
counted per transformer block (Korthikanti et al. 2022, "Reducing Activation Recomputation"),
rewritten for the blocks this project runs and checked against the tensors autograd actually
saves (``tests/unit/test_autotune.py``).

Bytes are computed exactly; GiB (2^30) only when printed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # no torch import at module load: the launcher and the tuner's CLI read this module
    from dtp_ds.models.reducers import TokenPlan

GiB = 2**30

# Empirical constants, each a typical figure rather than a measurement on the users' machines:
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces (torch 2.x, lazy module loading)
NCCL_BYTES = int(0.35 * GiB)  # NCCL communicator buffers and its kernels' module, once world size > 1
FRAGMENTATION = 0.05  # caching-allocator reserve over the allocated peak for fixed-shape training
BWD_TRANSIENT = 0.5  # gradient buffers in flight inside one block's backward, per byte the block saved
PROCESS_HOST_BYTES = 4 * GiB  # host RAM per training process besides offloaded states (torch, CUDA host, loader)

# DeepSpeed defaults (deepspeed.runtime.zero.config / engine.MEMORY_OPT_ALLREDUCE_SIZE).
DS_REDUCE_BUCKET = int(5e8)
DS_PREFETCH_BUCKET = int(5e7)
DS_ALLREDUCE_BUCKET = int(5e8)

SETTINGS = ("deepspeed", "amp-ddp")
PRECISIONS = ("fp32", "bf16", "fp16")
OFFLOADS = ("none", "optimizer", "optimizer+param")


@dataclass(frozen=True)
class TowerShape:
    """One transformer tower, as its blocks see it (per sample)."""

    width: int
    heads: int
    mlp: int
    layers: int
    tokens: int  # full sequence length (image: 1 + patches; text: context length)


@dataclass(frozen=True)
class ImagePlan:
    """A dtp_ds trunk's image side: its reducer, the rate planned for, the reducer's
    :class:`~dtp_ds.models.reducers.TokenPlan` (per-block tokens, padding, its own saved
    bytes) and the trunk's stem."""

    reducer: str  # the reducer's type name ("none": a plain ViT)
    rate: float | None  # the rate planned for (None: the reducer has none)
    plan: TokenPlan
    stem: str = "patch"  # "patch" (a ViT's linear patch embedding) or "conv" (stride-2 convolutions)


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about one CLIP model."""

    name: str
    image_size: int
    patch_size: int
    image: TowerShape
    text: TowerShape
    embed_dim: int
    trunk: ImagePlan | None  # None: open_clip's own ViT tower
    params: int  # both towers
    params_matmul: int  # weights of matmuls and convolutions (what autocast casts to 16 bits)
    largest_layer: int  # params of the largest module (ZeRO-3 gathers per module)
    largest_param: int  # numel of the largest single parameter

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TrainSetup:
    """How one GPU trains: engine, precision, ZeRO, checkpointing, world size, loss."""

    setting: str = "deepspeed"  # "deepspeed" (this project) or "amp-ddp" (open_clip's trainer: AMP + DDP)
    precision: str = "bf16"  # fp32 | bf16 | fp16 (amp-ddp: fp16 autocast over fp32 weights)
    stage: int = 0
    offload: str = "none"
    ckpt: bool = False
    world: int = 1
    accum: int = 1  # the engine's gradient_accumulation_steps
    gradcache: bool = False  # --accum-freq: the accum micro-batches of a step are one contrastive batch
    local_loss: bool = False
    attention: str = "efficient"  # SDPA's flash / memory-efficient kernels; "math" materialises the scores
    autocast_device: str = "cuda"  # whose autocast rules amp-ddp follows ("cpu" only to check against CPU runs)
    reduce_bucket_size: int = DS_REDUCE_BUCKET
    prefetch_bucket_size: int = DS_PREFETCH_BUCKET
    overlap_comm: bool | None = None  # None: DeepSpeed's default (on for ZeRO-3 only)

    @property
    def contrastive_micro(self) -> int:
        """Micro-batches per rank in one contrastive loss."""
        return self.accum if self.gradcache else 1

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.offload not in OFFLOADS:
            raise ValueError(f"offload must be one of {OFFLOADS}, got {self.offload!r}")
        if self.offload != "none" and self.stage == 0:
            raise ValueError("optimizer offload needs ZeRO stage >= 1")
        if self.offload == "optimizer+param" and self.stage != 3:
            raise ValueError("parameter offload needs ZeRO stage 3")


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element: the image and text towers' residual streams (what LayerNorms save)
    and the matmul inputs (c)."""

    r_image: int
    r_text: int
    c: int

    @staticmethod
    def of(setup: TrainSetup) -> Dtypes:
        if setup.setting == "amp-ddp":
            if setup.autocast_device == "cuda":
                # CUDA autocast runs LayerNorm in fp32: it casts the input and saves the fp32
                # copy, whatever the stream's dtype; matmuls save fp16 inputs.
                return Dtypes(r_image=4, r_text=4, c=2)
            # CPU autocast leaves LayerNorm alone: the image stream is 16-bit after the patch
            # convolution (open_clip casts its embeddings to it), the text stream stays fp32.
            return Dtypes(r_image=2, r_text=4, c=2)
        b = 4 if setup.precision == "fp32" else 2
        return Dtypes(b, b, b)

    def tower(self, image: bool) -> BlockDtypes:
        return BlockDtypes(self.r_image if image else self.r_text, self.c)


@dataclass(frozen=True)
class BlockDtypes:
    """Bytes per element inside one tower: residual stream (r), matmul inputs (c)."""

    r: int
    c: int


# --- activations -----------------------------------------------------------------------------
LN_STAT_BYTES = 4  # LayerNorm saves mean and rstd in fp32 on CUDA (2 per token per LayerNorm)


def block_bytes_per_token(width: int, mlp: int, heads: int, dt: BlockDtypes, attention: str = "efficient",
                          seq_len: int = 0, ln_stat_bytes: int = LN_STAT_BYTES) -> float:
    """Bytes a pre-norm transformer block saves for backward, per token.

    LayerNorm inputs (2 x width, residual dtype) + matmul inputs in the compute dtype: q/k/v
    input (width), the q/k/v buffer SDPA keeps (3 width), the attention output, which is also
    the output projection's input (width), MLP input (width), GELU input (mlp), second matmul
    input (mlp); the flash / memory-efficient kernels add a float log-sum-exp per head. The
    math path instead keeps the scaled q and k (2 width) and the probabilities (heads x seq_len).
    Without dropout this is Korthikanti et al.'s 34 sbh in 16 bits, minus their dropout masks.
    """
    ln = 2 * width * dt.r + 2 * 2 * ln_stat_bytes
    common = (6 * width + 2 * mlp) * dt.c
    if attention == "efficient":
        return ln + common + 4 * heads
    if attention == "math":
        return ln + common + 2 * width * dt.c + heads * seq_len * dt.c
    raise ValueError(f"attention must be 'efficient' or 'math', got {attention!r}")


def packed_block_bytes(rows: float, padded: float | None, width: int, mlp: int, heads: int, dt: BlockDtypes,
                       ln_stat_bytes: int = LN_STAT_BYTES) -> float:
    """Bytes a block saves on packed sequences of unequal length, per sample: token-wise layers on
    ``rows`` real tokens (the packed q/k/v too, which the scatter into the padded layout
    keeps), SDPA's q/k/v and output on the ``padded`` layout. ``padded=None``: every sample
    has the same length, the packed rows are the padded layout (views), a dense block."""
    if padded is None:
        return rows * block_bytes_per_token(width, mlp, heads, dt, ln_stat_bytes=ln_stat_bytes)
    per_row = 2 * width * dt.r + 2 * 2 * ln_stat_bytes + (6 * width + 2 * mlp) * dt.c + 8  # + int64 pad index
    # padded layout: q/k/v and the output, the log-sum-exp, and the key mask SDPA turns into a float bias
    return rows * per_row + padded * (4 * width * dt.c + 4 * heads + 4)


@dataclass
class Activations:
    """Per-sample activation bytes of one forward, split by where they live."""

    image_blocks: float
    text_blocks: float
    other: float  # embeddings, LayerNorms outside blocks, the reducer's own layers, projections
    largest_block: float  # the one block whose backward (or recomputation) is in flight

    @property
    def saved(self) -> float:
        return self.image_blocks + self.text_blocks + self.other


def conv_stem_bytes(image_size: int, patch: int, width: int, c: int) -> float:
    """Per-sample bytes a conv stem saves: each stride-2 3x3 conv's input and its GELU's
    input, then the 1x1 projection's input (mirrors ``dtp_ds.models.vit.ConvStem``)."""
    steps = patch.bit_length() - 1
    total, side = 3 * image_size**2, image_size
    for i in range(steps):
        out = max(16, width // 2 ** (steps - i))
        side //= 2
        total += 2 * out * side * side  # GELU input, and its output (the next conv's input)
    return total * c


def activations_per_sample(shape: ModelShape, setup: TrainSetup, ln_stat_bytes: int = LN_STAT_BYTES) -> Activations:
    """Bytes saved for backward per sample (the contrastive logits are separate: they scale
    with the global batch)."""
    dt = Dtypes.of(setup)
    di, dtt = dt.tower(True), dt.tower(False)
    v, t = shape.image, shape.text
    s = ln_stat_bytes

    def dense(tw: TowerShape, tokens: float, bd: BlockDtypes) -> float:
        return tokens * block_bytes_per_token(tw.width, tw.mlp, tw.heads, bd, setup.attention, int(tokens), s)

    def ln(tokens: float, width: int, r: int) -> float:
        return tokens * (width * r + 2 * s)

    # Text tower: token ids, blocks, ln_final input, the pooled (gathered: a copy) token.
    text_blocks = [(t.layers, dense(t, t.tokens, dtt), t.tokens, dtt.r)]
    text_other = t.tokens * 8 + ln(t.tokens, t.width, dtt.r) + t.width * dt.c

    # Image tower: patch embedding input, norm_pre/ln_pre input, blocks, final norm, pooling.
    full = shape.patches + 1
    if shape.trunk is None:
        image_blocks = [(v.layers, dense(v, full, di), full, di.r)]
        # ln_pre and ln_post inputs, and ln_post's output (in the stream's dtype): the pooled
        # CLS row is a view of it, which the projection matmul saves, so all of it stays alive.
        image_other = 3 * shape.image_size**2 * dt.c + 2 * ln(full, v.width, di.r) + full * v.width * dt.c
    else:
        tp = shape.trunk.plan
        image_blocks = [(1, dense(v, rows, di) if pad is None else packed_block_bytes(rows, pad, v.width, v.mlp,
                                                                                       v.heads, di, s), rows, di.r)
                        for rows, pad in zip(tp.tokens, tp.padded)]
        stem = (conv_stem_bytes(shape.image_size, shape.patch_size, v.width, dt.c) if shape.trunk.stem == "conv"
                else 3 * shape.image_size**2 * dt.c)
        # final norm input; the mean over packed rows keeps an fp32 copy; the head's input
        head = ln(tp.final, v.width, di.r) + (tp.final * v.width * 4 if tp.final_packed else 0) + v.width * dt.c
        image_other = stem + ln(full, v.width, di.r) + tp.reducer_bytes + head

    def total(groups: list[tuple[int, float, float, int]]) -> float:
        return sum(n * b for n, b, _, _ in groups if n)

    def ckpt_total(groups: list[tuple[int, float, float, int]], width: int) -> float:
        # Non-reentrant checkpointing keeps each block's input only.
        return sum(n * tokens * width * r for n, _, tokens, r in groups if n)

    largest = max(b for n, b, _, _ in image_blocks + text_blocks if n)
    if setup.ckpt:
        return Activations(ckpt_total(image_blocks, v.width), ckpt_total(text_blocks, t.width),
                           image_other + text_other, largest)
    return Activations(total(image_blocks), total(text_blocks), image_other + text_other, largest)


def logits_bytes(shape: ModelShape, setup: TrainSetup, micro: int) -> float:
    """open_clip's ClipLoss in fp32 over ``micro`` samples per rank: per direction the logits'
    log-softmax is saved and its gradient allocated in backward (2 x 2 matrices); rows = the
    contrastive batch over all ranks, or the local samples with ``--local-loss``; columns = the
    contrastive batch. Plus the gathered features."""
    cols = micro * setup.world
    rows = micro if (setup.local_loss or setup.world == 1) else cols
    features = 2 * cols * shape.embed_dim * 4 * 2
    return 4 * rows * cols * 4 + features


# --- model states -----------------------------------------------------------------------------
@dataclass
class Estimate:
    """Predicted per-GPU memory (bytes) of one setup at one micro-batch."""

    micro: int
    components: dict[str, float]  # the larger phase's parts
    phase: str  # "forward/backward", "optimizer step" or (GradCache) "contrastive loss"
    peak: float  # what torch.cuda.max_memory_reserved() + the context should read
    cpu_per_process: float = 0.0  # host RAM for offloaded states, per GPU process

    @property
    def peak_gib(self) -> float:
        return self.peak / GiB

    def table(self) -> dict[str, float]:
        return {k: round(v / GiB, 3) for k, v in self.components.items()}


def model_states(shape: ModelShape, su: TrainSetup) -> tuple[dict[str, float], dict[str, float], float]:
    """(forward/backward components, optimizer-step components, host bytes per process)."""
    P, W = float(shape.params), su.world
    fb: dict[str, float] = {}
    st: dict[str, float] = {}
    host = 0.0
    if su.setting == "amp-ddp":
        # open_clip's trainer: fp32 weights, AdamW (foreach), GradScaler, DDP when world > 1,
        # optimizer.zero_grad() -> grads are None during the next forward (torch >= 2.0).
        fb["params"] = st["params"] = 4 * P
        fb["optimizer"] = st["optimizer"] = 8 * P
        fb["amp_weight_cache"] = 2.0 * shape.params_matmul  # fp16 weight copies, saved for backward
        st["grads"] = 4 * P
        if su.accum > 1:
            fb["grads"] = 4 * P
        if W > 1:  # gradient_as_bucket_view=False (open_clip's default): the buckets are a 2nd copy
            fb["ddp_buckets"] = st["ddp_buckets"] = 4 * P
        st["step_transient"] = 4 * P  # _multi_tensor_adamw: exp_avg_sq.sqrt() for the whole group
        return fb, st, host

    lp = 4 if su.precision == "fp32" else 2
    mixed = su.precision != "fp32"
    offload_opt = su.offload in ("optimizer", "optimizer+param")
    if su.stage == 0:
        fb["params"] = st["params"] = lp * P
        st["grads"] = lp * P
        if su.accum > 1:
            fb["grads"] = lp * P
        if mixed:  # FP16_Optimizer: fp32 master + Adam; step flattens fp32 copies of the grads
            fb["optimizer"] = st["optimizer"] = 12 * P
            st["step_transient"] = 8 * P
        else:
            fb["optimizer"] = st["optimizer"] = 8 * P
            st["step_transient"] = 4 * P
        if W > 1:
            st["comm_buffers"] = lp * min(P, DS_ALLREDUCE_BUCKET)
        return fb, st, host

    # ZeRO 1-3 (DeepSpeedZeroOptimizer / Stage3): fp32 master + Adam moments partitioned over W.
    opt_states = 12 * P / W
    overlap = su.overlap_comm if su.overlap_comm is not None else su.stage == 3
    # The reduce (ipg) bucket is allocated whole at the start of every backward, whatever the
    # model's size (5e8 elements by default: 1 GB in 16 bits), twice with overlap_comm.
    bucket = lp * su.reduce_bucket_size * (2 if overlap else 1)
    if su.stage in (1, 2):
        fb["params"] = st["params"] = lp * P
    else:
        working = lp * (2 * shape.largest_layer + su.prefetch_bucket_size)
        part = 0.0 if su.offload == "optimizer+param" else lp * P / W
        fb["params"] = st["params"] = part + working
        if su.offload == "optimizer+param":
            host += lp * P / W
    if su.stage == 1:
        st["grads"] = lp * P  # stage 1 keeps full 16-bit grads until the boundary reduction
        if su.accum > 1:
            fb["grads"] = lp * P
        fb["comm_buffers"] = bucket
    else:
        grads = lp * P / W
        if offload_opt:  # grads stream to the pinned fp32 partition on the host
            grads = 4.0 * shape.largest_param  # temp_grad_buffer for the largest parameter
        fb["grads"] = st["grads"] = grads
        fb["comm_buffers"] = bucket  # the reduce (ipg) bucket fills during backward
        if su.stage == 3:
            st["comm_buffers"] = bucket
    if offload_opt:
        host += opt_states + 4 * P / W + lp * P / W  # + fp32 grad partition + 16-bit copy buffer
    else:
        fb["optimizer"] = st["optimizer"] = opt_states
        st["step_transient"] = 8 * P / W  # fp32 grad partition + AdamW foreach temporaries
    return fb, st, host


def estimate(shape: ModelShape, setup: TrainSetup, micro: int, fragmentation: float = FRAGMENTATION,
             ln_stat_bytes: int = LN_STAT_BYTES, context_bytes: int = CUDA_CONTEXT_BYTES) -> Estimate:
    """Predicted peak memory per GPU for ``micro`` samples per GPU (``context_bytes=0`` for a
    CPU process, which has no CUDA context)."""
    fb, st, host = model_states(shape, setup)
    act = activations_per_sample(shape, setup, ln_stat_bytes)
    fb["activations"] = micro * act.saved
    # Backward through one block allocates gradients of its intermediates a few at a time: at
    # most the MLP-wide pair (grad of the GELU's input and output), about half of what the block
    # saved. Under checkpointing the block's forward is first recomputed (all of it saved again).
    fb["backward_transient"] = micro * act.largest_block * (BWD_TRANSIENT + (1.0 if setup.ckpt else 0.0))
    phases = {"forward/backward": fb, "optimizer step": st}
    if setup.gradcache:
        # The whole batch's loss runs between the passes, when no chunk's activations are alive:
        # its logits, the cached features, their concatenation and gradients. The gradients stay
        # while the chunks run again.
        whole = micro * setup.contrastive_micro
        feats = 2 * whole * shape.embed_dim * Dtypes.of(setup).c
        fb["feature_cache"] = feats
        states = {k: v for k, v in fb.items() if k not in ("activations", "backward_transient")}
        phases["contrastive loss"] = {**states, "feature_cache": 3 * feats,
                                      "contrastive_logits": logits_bytes(shape, setup, whole)}
    else:
        fb["contrastive_logits"] = logits_bytes(shape, setup, micro)
    fixed = context_bytes + (NCCL_BYTES if setup.world > 1 else 0)
    ctx = {"cuda_context": context_bytes} if context_bytes else {}
    if setup.world > 1:
        ctx["nccl"] = NCCL_BYTES
    phase, parts = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    peak = fixed + (1 + fragmentation) * sum(parts.values())
    comps = {**ctx, **parts, "fragmentation": fragmentation * sum(parts.values())}
    return Estimate(micro, comps, phase, peak, host + (PROCESS_HOST_BYTES if host else 0.0))


def search_max(fits: Callable[[int], bool], start: int, cap: int = 1 << 16, rel_tol: float = 0.0) -> int:
    """Largest ``m`` in ``[1, cap]`` with ``fits(m)`` for a monotone ``fits`` (0 if even 1
    fails). Starts at ``start`` (the prediction), doubles or halves until the boundary is
    bracketed, then bisects until ``hi - lo <= max(1, rel_tol * lo)``."""
    start = max(1, min(start, cap))
    lo, hi = 0, cap + 1  # invariant: lo fits (0: nothing known to fit), hi fails (cap + 1: unknown)
    if fits(start):
        lo = start
        while lo < cap:
            nxt = min(cap, lo * 2)
            if fits(nxt):
                lo = nxt
            else:
                hi = nxt
                break
        else:
            return lo
    else:
        hi = start
        while hi > 1:
            nxt = hi // 2
            if fits(nxt):
                lo = nxt
                break
            hi = nxt
        if lo == 0:
            return 0
    while hi - lo > max(1, int(rel_tol * lo)):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_micro_batch(shape: ModelShape, setup: TrainSetup, budget_bytes: float, upper: int = 1 << 16,
                    **kw: Any) -> int:
    """Largest micro-batch whose predicted peak fits ``budget_bytes`` (0 if none does)."""
    return search_max(lambda m: estimate(shape, setup, m, **kw).peak <= budget_bytes, 1, upper)


# --- model shapes -----------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _meta_model(name: str) -> Any:
    """The real model built on the meta device (no memory, about 50 ms)."""
    import open_clip
    import torch

    import dtp_ds  # noqa: F401  (registers dtp_ds's configs)

    with torch.device("meta"):  # build on meta from the start: no fp32 initialisation on the CPU
        return open_clip.create_model(name, device="meta")


@lru_cache(maxsize=64)
def _param_counts(name: str) -> tuple[int, int, int, int]:
    """(params, matmul params, largest module's params, largest parameter) of the real model."""
    model = _meta_model(name)
    total = matmul = largest_param = 0
    for pname, p in model.named_parameters():
        total += p.numel()
        largest_param = max(largest_param, p.numel())
        # autocast casts matmul/conv weights; embedding tables and added position embeddings stay fp32
        if p.ndim >= 2 and not any(k in pname for k in ("embedding", "pos_embed", "cls_token")):
            matmul += p.numel()
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, matmul, largest_layer, largest_param


def image_plan(name: str, patches: int, width: int, rate: float | None = None,
               padding_sigmas: float = 3.0) -> ImagePlan | None:
    """The image trunk's plan from its token reducer (:meth:`TokenReducer.plan`), at ``rate``
    (None: the reducer's own); None for open_clip's own towers."""
    from dtp_ds.models import trunks
    from dtp_ds.models.vit import ConvStem

    found = trunks(_meta_model(name).visual)
    if not found:
        if rate is not None:
            raise ValueError(f"{name} has no token reducer: --boundary-rate does not apply")
        return None
    trunk, reducer = found[0], found[0].reducer
    if rate is not None:
        if reducer.default_rate() is None:
            raise ValueError(f"{name}'s {reducer.type_name!r} reducer has no rate: --boundary-rate does not apply")
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"boundary rate must be in (0, 1], got {rate}")
    return ImagePlan(reducer.type_name, rate if rate is not None else reducer.default_rate(),
                     reducer.plan(patches, trunk.depth, width, rate, padding_sigmas),
                     "conv" if isinstance(trunk.patch_embed, ConvStem) else "patch")


def model_shape(name: str, image_size: int | None = None, context_length: int | None = None,
                boundary_rate: float | None = None, padding_sigmas: float = 3.0) -> ModelShape:
    """The shape of a registered model (open_clip or dtp_ds), optionally at another image size,
    context length, or reducer rate (e.g. the boundary rate a checkpoint learned);
    ``padding_sigmas=0``: every sample keeps the same number of tokens (pinned)."""
    from dtp_ds.models import get_model_config

    cfg = get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown model '{name}' (dtp_ds.list_models() or open_clip.list_models())")
    vc, tc = cfg["vision_cfg"], cfg["text_cfg"]
    if "layers" not in vc or not isinstance(vc["layers"], int):
        raise ValueError(f"{name}: only ViT image towers are modelled")
    vw = vc.get("width", 768)
    size = image_size or vc.get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    patch = vc.get("patch_size", 16)
    image = TowerShape(vw, vw // vc.get("head_width", 64), int(vw * vc.get("mlp_ratio", 4.0)), vc["layers"],
                       1 + (size // patch) ** 2)
    tw = tc.get("width", 512)
    ctx = context_length or tc.get("context_length", 77)
    text = TowerShape(tw, tc.get("heads", 8), int(tw * tc.get("mlp_ratio", 4.0)), tc.get("layers", 12), ctx)
    trunk = image_plan(name, (size // patch) ** 2, vw, boundary_rate, padding_sigmas)
    params, matmul, largest_layer, largest_param = _param_counts(name)
    return ModelShape(name, size, patch, image, text, cfg["embed_dim"], trunk, params, matmul, largest_layer,
                      largest_param)


# --- the trainer's start-up check -----------------------------------------------------------
def offload_of(cfg: dict[str, Any]) -> str:
    """The :data:`OFFLOADS` name of a ds_config's ZeRO offload."""
    z = cfg.get("zero_optimization", {})
    if "offload_param" in z:
        return "optimizer+param"
    return "optimizer" if "offload_optimizer" in z else "none"


def setup_from_ds_config(cfg: dict[str, Any], world: int, local_loss: bool = False,
                         ckpt: bool | None = None, gradcache: bool = False) -> TrainSetup:
    """The :class:`TrainSetup` a (resolved) ds_config trains with at ``world`` ranks;
    ``ckpt=None``: activation checkpointing iff the config has that section (as the trainer);
    ``gradcache``: its accumulation steps are GradCache chunks (``--accum-freq``). A checkpointing
    option the trainer refuses (``cpu_checkpointing`` ...) is refused here too: the model counts
    block inputs kept on the device."""
    from dtp_ds.train.ds_config import check_activation_checkpointing, precision_of

    check_activation_checkpointing(cfg, "the ds_config")
    z = cfg.get("zero_optimization", {})
    return TrainSetup(precision=precision_of(cfg), stage=z.get("stage", 0), offload=offload_of(cfg),
                      ckpt=("activation_checkpointing" in cfg) if ckpt is None else ckpt, world=world,
                      accum=cfg.get("gradient_accumulation_steps", 1), gradcache=gradcache, local_loss=local_loss,
                      reduce_bucket_size=z.get("reduce_bucket_size", DS_REDUCE_BUCKET),
                      prefetch_bucket_size=z.get("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET),
                      overlap_comm=z.get("overlap_comm"))


def predict_peak_gib(model_name: str, ds_config: dict[str, Any], micro: int | None, world: int,
                     local_loss: bool = False, ckpt: bool | None = None, image_size: int | None = None,
                     gradcache: bool = False) -> float:
    """Predicted peak GiB per GPU of training ``model_name`` with ``ds_config`` at ``micro``
    samples per GPU (None: the config's ``train_micro_batch_size_per_gpu``) on ``world`` ranks.
    ``--gather-with-grad`` changes the gradients, not the memory: it is no argument here."""
    micro = micro or ds_config["train_micro_batch_size_per_gpu"]
    shape = model_shape(model_name, image_size)
    return estimate(shape, setup_from_ds_config(ds_config, world, local_loss, ckpt, gradcache), micro).peak_gib


class PredictedOOM(ValueError):
    """The run is predicted not to fit in GPU memory; the message names the fixes."""


def check_start_memory(model_name: str, ds_config: dict[str, Any], micro: int | None, world: int,
                       gpu_bytes: float, local_loss: bool = False, gather_with_grad: bool = False,
                       ckpt: bool | None = None, image_size: int | None = None,
                       gradcache: bool = False) -> tuple[dict[str, bool], str | None]:
    """The start-up memory check at the real world size, on a GPU of ``gpu_bytes``.

    Returns ``(changes, message)``: ``({}, None)`` when the predicted peak fits; when only the
    full contrastive loss's (contrastive batch)^2 logits make it not fit, ``{"local_loss": True,
    "gather_with_grad": True}`` (the same gradients, logits local x global contrastive batch) and
    a message saying so. Raises :class:`PredictedOOM` naming the fixes when even that does not
    fit. ``gradcache``: the accumulation steps are GradCache chunks of one contrastive batch."""
    micro = micro or ds_config["train_micro_batch_size_per_gpu"]
    args = (model_name, ds_config, micro, world)
    peak = predict_peak_gib(*args, local_loss, ckpt, image_size, gradcache)
    budget = gpu_bytes / GiB
    if peak <= budget:
        return {}, None
    chunks = ds_config.get("gradient_accumulation_steps", 1) if gradcache else 1
    batch = f"micro-batch {micro}" + (f" x {chunks} GradCache chunks" if chunks > 1 else "")
    where = (f"{model_name} at {batch} x {world} ranks is predicted to need {peak:.1f} GiB per GPU "
             f"(the GPU has {budget:.1f} GiB)")
    if not (local_loss and gather_with_grad):
        local = predict_peak_gib(*args, True, ckpt, image_size, gradcache)
        if local <= budget:
            return ({"local_loss": True, "gather_with_grad": True},
                    f"{where} with the full contrastive loss, whose logits are (contrastive batch)^2: turned on "
                    f"--local-loss --gather-with-grad (the same gradients; logits local x global contrastive "
                    f"batch), predicted {local:.1f} GiB")
    setup = setup_from_ds_config(ds_config, world, True, ckpt)
    fits = max_micro_batch(model_shape(model_name, image_size), setup, gpu_bytes, upper=micro)
    raise PredictedOOM(f"{where}; it does not fit even with --local-loss --gather-with-grad. Fixes: a micro-batch of "
                     f"at most {fits} (--batch-size, with --accum-freq K to keep the contrastive batch whole: "
                     f"GradCache), --grad-checkpointing, a higher ZeRO stage; tools/autotune_batch --model "
                     f"{model_name} --nodes ... --gpus-per-node ... --global-batch N writes a ds_config that fits")
