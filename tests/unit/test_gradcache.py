"""GradCache (``--accum-freq``, dtp_ds/train/gradcache.py) on one rank: the task module's split
loss, the replayed noise, and real DeepSpeed engines (tests/dist/gradcache_ranks.py, one process):
one optimizer step of K chunks equals one large batch of K x micro."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from dtp_ds.cluster.ports import free_port
from dtp_ds.models import registry
from dtp_ds.tasks.clip import CLIPModule
from dtp_ds.train.gradcache import rng_state, set_rng_state, split_batch
from tests.conftest import REPO
from tests.dist.gradcache_ranks import NOISY_DRIP, noisy, noisy_drip_config

CASES = ["large:vit:3:fp32", "large:drip:0:fp32:ckpt", "plain:vit:0:fp32", "overflow:vit:2:fp16"]


@pytest.fixture(scope="module")
def noisy_model() -> torch.nn.Module:
    """The noisy DRIP of tests/dist/gradcache_ranks.py, its name registered only while built."""
    registry.register_config(NOISY_DRIP, noisy_drip_config())
    try:
        torch.manual_seed(0)
        return noisy(open_clip.create_model(NOISY_DRIP, output_dict=True, nonscalar_logit_scale=True))
    finally:
        registry._REGISTERED.pop(NOISY_DRIP, None)
        open_clip.factory._MODEL_CONFIGS.pop(NOISY_DRIP, None)


def _batch(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n, 3, 64, 64, generator=g), "text": torch.randint(1, 1000, (n, 32), generator=g)}


def test_the_module_loss_is_its_coupled_loss_plus_its_own(noisy_model):
    module, batch = CLIPModule(noisy_model).train(), _batch()
    torch.manual_seed(3)
    whole = module(batch)
    torch.manual_seed(3)
    enc = module(batch, encode=True)
    assert set(enc) >= {"batched", "shared", "own_loss", "boundary_loss", "compression", "image_tokens"}
    split = module.coupled_loss(enc["batched"], enc["shared"])
    assert torch.allclose(whole["loss"], split["loss"] + enc["own_loss"], rtol=0, atol=1e-6)
    assert torch.equal(whole["contrastive_loss"], split["contrastive_loss"])


def test_a_saved_rng_state_replays_every_kind_of_noise(noisy_model):
    """Gumbel boundaries, drop path and token dropout all draw from the generators GradCache
    saves: the same state, the same forward; another state, another one."""
    module, batch = CLIPModule(noisy_model).train(), _batch()
    torch.manual_seed(5)
    state = rng_state(torch.device("cpu"))
    with torch.no_grad():
        first = module(batch, encode=True)
        second = module(batch, encode=True)
    set_rng_state(state, torch.device("cpu"))
    replay = module(batch, encode=True)  # with gradients, as GradCache's second pass
    for name in ("image_features", "text_features"):
        assert torch.equal(replay["batched"][name].detach(), first["batched"][name])
    assert not torch.equal(second["batched"]["image_features"], first["batched"]["image_features"])
    assert torch.equal(replay["own_loss"].detach(), first["own_loss"])


def test_a_batch_splits_into_equal_chunks_only():
    parts = split_batch(_batch(6), 3)
    assert [p["image"].shape[0] for p in parts] == [2, 2, 2]
    assert torch.equal(torch.cat([p["text"] for p in parts]), _batch(6)["text"])
    with pytest.raises(ValueError, match="does not split into 4 equal chunks"):
        split_batch(_batch(6), 4)


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("gradcache")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "dist" / "gradcache_ranks.py"), str(out), *CASES],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {case: json.loads((Path(out) / f"{case.replace(':', '_')}.json").read_text()) for case in CASES}


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("large")])
def test_gradcache_steps_equal_one_large_batch(engines, case):
    """Two optimizer steps (plain SGD: a parameter moves by lr x its gradient) from the same
    weights, data and RNG: the parameters agree to fp32 rounding, and the step's logged loss is
    the whole batch's. DRIP (Gumbel boundaries, drop path, token dropout) only agrees because
    each chunk's second forward replays the noise of its first (here under activation
    checkpointing, whose recomputation replays it once more)."""
    r = engines[case]
    assert r["max_update"] > 1e-2  # the steps moved the weights
    assert r["max_diff"] < 5e-7, r
    assert r["loss_gradcache"] == pytest.approx(r["loss_reference"], rel=1e-6)


def test_plain_accumulation_is_not_one_large_batch(engines):
    """The control: K micro-batches each with its own contrastive loss move the weights elsewhere
    (and see a smaller, easier contrastive problem)."""
    r = engines["plain:vit:0:fp32"]
    assert r["max_diff"] > 1e-3 and all(p < g for p, g in zip(r["loss_reference"], r["loss_gradcache"]))


def test_fp16_overflow_in_one_chunk_skips_the_whole_step(engines):
    """ZeRO-2 fp16: the second chunk's backward overflows; the step is skipped once (not per
    chunk): no parameter moves, the loss scale halves once, and the next step applies cleanly."""
    r = engines["overflow:vit:2:fp16"]
    assert r["grad_calls"] == 3  # the three chunks' second forwards all ran
    assert r["skipped_after_1"] == 1 and r["changed_by_1"] == 0.0
    assert r["scale_after_1"] == r["scale_before"] / 2
    assert r["skipped_after_2"] == 1 and r["changed_by_2"] > 0 and r["finite"]
