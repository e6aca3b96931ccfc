"""GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"; open_clip's ``--accum-freq``): one optimizer step over a contrastive batch of
K chunks of the engine's micro-batch, exactly the step one batch of K x micro would take.

1. Caching pass: every chunk is encoded without gradients (through the engine, so ZeRO-3
   gathers the parameters); the RNG state before each is kept.
2. The task's coupled loss over every chunk's features (gathered across ranks as in a plain
   step) gives the loss of the whole batch and its gradient with respect to each feature.
3. Each chunk is encoded again with gradients from its own RNG state (DRIP's Gumbel noise,
   drop path, token dropout draw what they drew in the caching pass) and back-propagates
   ``sum(features * their cached gradient)``, the shared inputs' (logit scale) ``/ K`` and its
   own loss (reducer auxiliary losses, a mean over its samples) ``/ K``: the gradients summed
   over the chunks are the whole batch's. ``engine.backward(..., scale_wrt_gas=False)``: the
   chunks are parts of one loss, not K losses to average; the engine's
   ``gradient_accumulation_steps`` is K, so it applies (or, on fp16 overflow in any chunk,
   skips) one optimizer step after the last chunk.

Memory: one chunk's activations, the whole batch's features and their gradients, and the
whole batch's logits while step 2 runs (``dtp_ds.autotune.memory``). Cost: one more forward.
"""
from __future__ import annotations

import torch

from dtp_ds.tasks import SplitLoss
from dtp_ds.train.guard import NonFiniteGuard
from dtp_ds.train.trainer import current_lr, engine_step

RngState = tuple[torch.Tensor, torch.Tensor | None]


def rng_state(device: torch.device) -> RngState:
    """The generators a forward draws its noise from: the CPU's and, off the CPU, the device's."""
    on_device = None if device.type == "cpu" else torch.get_device_module(device.type).get_rng_state(device)
    return torch.get_rng_state(), on_device


def set_rng_state(state: RngState, device: torch.device) -> None:
    cpu, on_device = state
    torch.set_rng_state(cpu)
    if on_device is not None:
        torch.get_device_module(device.type).set_rng_state(on_device, device)


def split_batch(inputs: dict[str, torch.Tensor], chunks: int) -> list[dict[str, torch.Tensor]]:
    sizes = {t.shape[0] for t in inputs.values()}
    if len(sizes) != 1 or next(iter(sizes)) % chunks:
        raise ValueError(f"a batch of {sizes} samples does not split into {chunks} equal chunks")
    parts = {k: t.chunk(chunks) for k, t in inputs.items()}
    return [{k: p[i] for k, p in parts.items()} for i in range(chunks)]


class GradCacheStep:
    """The :class:`~dtp_ds.train.trainer.BatchStep` of ``--accum-freq K`` (see the module doc)."""

    def __init__(self, engine, module: SplitLoss, chunks: int, nonfinite: NonFiniteGuard,
                 device: torch.device) -> None:
        if not callable(getattr(module, "coupled_loss", None)):
            raise ValueError(f"{type(module).__name__} has no coupled_loss: GradCache needs a task module that "
                             f"splits its loss (dtp_ds.tasks.SplitLoss)")
        self.engine, self.module, self.chunks = engine, module, chunks
        self.nonfinite, self.device = nonfinite, device

    def _encode(self, chunk: dict[str, torch.Tensor]) -> dict:
        return self.engine({k: t.to(self.device, non_blocking=True) for k, t in chunk.items()}, encode=True)

    def __call__(self, inputs: dict[str, torch.Tensor], step: int) -> tuple[dict[str, torch.Tensor], float | None]:
        chunks = split_batch(inputs, self.chunks)
        states, cached = [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(rng_state(self.device))
                cached.append(self._encode(chunk))
        after = rng_state(self.device)
        grads, shared_grads, row, whole = self._feature_grads(cached)
        del cached
        whole = self.nonfinite.loss(whole, step)  # the fault hook's +inf reaches every chunk's backward
        row["loss"] = whole
        lr = None
        for chunk, state in zip(chunks, states):
            set_rng_state(state, self.device)
            enc = self._encode(chunk)
            part = self._surrogate(enc, grads.pop(0), shared_grads)
            self.engine.backward(self.nonfinite.backward_loss(part, whole), scale_wrt_gas=False)
            if self.engine.is_gradient_accumulation_boundary():
                lr = current_lr(self.engine)
            engine_step(self.engine)
        set_rng_state(after, self.device)  # the run's stream goes on as after one forward of the batch
        return row, lr

    def _feature_grads(self, cached: list[dict]) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor],
                                                           dict[str, torch.Tensor], torch.Tensor]:
        """The gradients of the whole batch's coupled loss: each chunk's, by feature name, and
        the shared inputs'; the step's row terms; its loss."""
        k = len(cached)
        batched = {n: torch.cat([c["batched"][n] for c in cached]).requires_grad_() for n in cached[0]["batched"]}
        shared = {n: v.detach().clone().requires_grad_() for n, v in cached[0]["shared"].items()}
        coupled = self.module.coupled_loss(batched, shared)
        found = torch.autograd.grad(coupled["loss"], [*batched.values(), *shared.values()], allow_unused=True)
        by_batched, by_shared = dict(zip(batched, found[:len(batched)])), dict(zip(shared, found[len(batched):]))
        grads = [{n: g.chunk(k)[i] for n, g in by_batched.items() if g is not None} for i in range(k)]
        shared_grads = {n: g for n, g in by_shared.items() if g is not None}
        # the chunks' own terms and statistics: means over equal chunks are the whole batch's
        own = {n: torch.stack([c[n].detach().float().reshape(()) for c in cached]).mean()
               for n in cached[0] if n not in ("batched", "shared")}
        row = {n: v.detach() for n, v in coupled.items() if n != "loss"}
        row.update({n: v for n, v in own.items() if n != "own_loss"})
        whole = coupled["loss"].detach() + own["own_loss"] if "own_loss" in own else coupled["loss"].detach()
        return grads, shared_grads, row, whole

    def _surrogate(self, enc: dict, grads: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]) -> torch.Tensor:
        """A scalar whose gradient is this chunk's share of the whole batch's."""
        terms = [(enc["batched"][n].float() * g.float()).sum() for n, g in grads.items()]
        terms += [(enc["shared"][n].float() * g.float()).sum() / self.chunks for n, g in shared.items()]
        if "own_loss" in enc:
            terms.append(enc["own_loss"].float() / self.chunks)
        return torch.stack(terms).sum()
