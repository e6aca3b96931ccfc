"""Fast checks of the fault machinery (the real runs are in tests/faults): bad-data counting,
the guards, storage estimates and checks, checkpoint commit leftovers and safe loading,
metrics that survive a kill, secrets redaction, and no shell strings anywhere."""
from __future__ import annotations

import ast
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dtp_ds.data import shards as sh
from dtp_ds.data.synthetic import write_synthetic_dataset
from dtp_ds.train import checkpoint, faults, storage
from dtp_ds.train.args import ConfigError, parse_args
from dtp_ds.train.checkpoint import CheckpointError, TrainState
from dtp_ds.train.guard import BadDataGuard, TrainingError, _FiniteStep
from dtp_ds.train.metrics import MetricsLogger, read_metrics
from dtp_ds.train.redact import MASK, RedactingFilter, redact, redact_obj
from tests.conftest import REPO
from tests.faults import corrupt

PER_SHARD = 20


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    out = tmp_path_factory.mktemp("damaged_unit")
    write_synthetic_dataset(out, num_train=5 * PER_SHARD, samples_per_shard=PER_SHARD, val_per_class=1,
                            image_size=32, seed=0)
    s = sorted((out / "train").glob("*.tar"))
    corrupt.corrupt_jpegs(s[0], 3)
    corrupt.drop_captions(s[1], 2)
    corrupt.truncate(s[2], 7)
    corrupt.replace_with_directory(s[3])
    return [str(p) for p in s]


def _decode_all(shard_list: list[str]) -> tuple[int, sh.BadCounts]:
    """One pass over the shards through the real read and decode stages."""
    def stage(image, sample):
        image.load()
        return torch.zeros(1), torch.zeros(1, 1) + len(sample["txt"].decode("utf-8"))

    stage.keys = ("txt",)
    decode = sh._DecodeCounted(stage, 0, 0)
    good, bad = 0, sh.BadCounts()
    for item in decode.run(sh._ReadShards().run(iter({"url": u} for u in shard_list))):
        if isinstance(item, sh.Bad):
            bad.add(item)
        else:
            good += 1
    return good, bad


def test_every_kind_of_bad_data_is_counted_exactly(damaged):
    good, bad = _decode_all(damaged)
    assert bad.counts == {"decode_error": 3, "no_caption": 2, "truncated_shards": 1, "unreadable_shards": 1,
                          "lost_in_shards": (PER_SHARD - 7) + PER_SHARD}
    assert good == 5 * PER_SHARD - 3 - 2 - (PER_SHARD - 7) - PER_SHARD
    assert bad.samples == 3 + 2 + 13 + 20
    assert set(bad.first) == set(damaged[:4])
    assert "not a regular file (directory)" in bad.first[damaged[3]]
    assert "after 7 samples of 20" in bad.first[damaged[2]]


def test_a_fifo_in_place_of_a_shard_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "00000.tar"
    os.mkfifo(fifo)
    (bad,) = list(sh.read_shard(str(fifo)))
    assert bad.kind == "unreadable_shards" and "special file" in bad.reason


def test_a_worker_gives_up_on_unusable_data():
    stage = sh._BatchCounted(4)
    with pytest.raises(sh.DataError, match="not one usable sample"):
        list(stage.run(iter([sh.Bad("decode_error", "s.tar", "x")] * sh.MAX_BAD_IN_A_ROW)))


def test_resume_skip_counts_complete_samples_only():
    complete = {"jpg": b"", "txt": b"", "__key__": "k"}
    stream = [sh.Bad("unreadable_shards", "a", "x"), {"jpg": b"", "__key__": "n"}, complete, complete, complete]
    skip = sh._SkipTrained(batches_done=1, batch_size=2)
    assert list(skip.run(iter(stream))) == [complete]  # 2 complete skipped; the marker and the incomplete dropped


def test_missing_shards_and_shell_unsafe_urls(damaged):
    train = os.path.dirname(damaged[0])
    present, missing = sh.split_shards(f"{train}/{{00000..00006}}.tar")
    assert missing == [f"{train}/00005.tar", f"{train}/00006.tar"] and len(present) == 5
    with pytest.raises(sh.DataError, match="quote"):
        sh.resolve_shards("https://host/x/{0..1}.tar'; rm -rf ~; '")
    sh.check_url("https://host/x.tar?X-Amz-Signature=abc&b=$c")  # no quote: safe inside webdataset's quotes
    sh.check_url("pipe:curl -s 'https://host/x.tar'")  # a command the user wrote


def test_bad_data_guard_warns_once_and_weighs_shard_losses_against_the_epoch(caplog):
    guard = BadDataGuard(max_fraction=0.1, epoch_samples=10_000)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            guard.add(sh.BadCounts({"decode_error": 1}, {"s1.tar": "decode_error: x"}))
    assert sum("s1.tar" in r.getMessage() for r in caplog.records) == 1
    state = TrainState(samples_seen=160)
    guard.account(state, guard.take())
    assert state.bad_by_kind == {"decode_error": 3} and state.bad_samples == 3
    guard.check(state)  # 3 bad of 163 read, but fewer than 1000 read: counted against 1000
    # a broken shard's 500 samples arrive at once: 5% of the epoch, not 500 / 660 read
    guard.account(state, [0, 0, 0, 500, 1, 0])
    guard.check(state)
    guard.account(state, [200, 0, 0, 0, 0, 0])
    with pytest.raises(TrainingError, match="--max-bad-fraction 0.1"):
        guard.check(state)


def test_finite_step_skips_a_plain_optimizer_on_nonfinite_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    _FiniteStep(SimpleNamespace(optimizer=opt))
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert opt.overflow and torch.equal(p.detach(), torch.ones(3)) and p.grad is None and not opt.state
    p.grad = torch.ones(3)
    opt.step()
    assert not opt.overflow and not torch.equal(p.detach(), torch.ones(3))
    assert opt._global_grad_norm == pytest.approx(3**0.5)  # what the engine reports as its grad norm


def test_guard_flags_and_fault_hooks(monkeypatch, capsys):
    args = parse_args(["--train-data", "x/{0..1}.tar", "--max-nonfinite-steps", "2", "--max-steps", "3",
                       "--peer-timeout-seconds", "30"])
    assert args.run.max_nonfinite_steps == 2 and args.optim.max_steps == 3 and args.run.peer_timeout_seconds == 30
    assert parse_args(["--train-data", "x.tar"]).run.max_nonfinite_steps == 5
    with pytest.raises(ConfigError, match="max-nonfinite-steps"):
        parse_args(["--train-data", "x.tar", "--max-nonfinite-steps", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--max-nonfinite-steps" in capsys.readouterr().out
    monkeypatch.setenv(faults.NONFINITE_ENV, "3,5-6@0")
    assert faults.nonfinite_injection() == ({3, 5, 6}, {0})
    monkeypatch.setenv(faults.NONFINITE_ENV, "3;4")
    with pytest.raises(ValueError, match="STEPS"):
        faults.nonfinite_injection()
    monkeypatch.setenv(faults.SAVE_HOLD_ENV, "4:commit")
    faults.hold_save(3, "commit", "/nowhere")  # another step: no hold
    monkeypatch.setenv(faults.SAVE_FAIL_ENV, "4:write@1,5:commit")
    faults.fail_save(4, "write")  # rank 0 here: rank 1's failure
    with pytest.raises(OSError, match="injected fault"):
        faults.fail_save(5, "commit")
    monkeypatch.setenv(faults.SAVE_FAIL_ENV, "4:flush")
    with pytest.raises(ValueError, match="STEP:PHASE"):
        faults.fail_save(4, "write")


def test_storage_estimates_and_checks(tmp_path):
    for done, last, every, epoch in [(0, 10, 3, 4), (5, 23, 0, 7), (0, 12, 4, 4), (3, 3, 1, 1), (0, 7, 0, 100)]:
        brute = {s for s in range(done + 1, last + 1) if (every and s % every == 0) or s % epoch == 0}
        brute |= {last} if last > done else set()
        assert storage.saves_planned(done, last, every, epoch) == len(brute), (done, last, every, epoch)
    ck = storage.checkpoint_bytes(10**6, "bf16", 2)
    assert storage.bytes_needed(ck, 10, 0, 3) == 4 * ck + storage.LOGS_MARGIN  # keep 3: 4 exist during a save
    assert storage.bytes_needed(ck, 10, 3, 3) == ck + storage.LOGS_MARGIN
    assert storage.bytes_needed(ck, 1, 0, 3) == ck + storage.LOGS_MARGIN
    assert storage.check_output_dir(str(tmp_path / "a" / "b"), 1, "x") is None
    assert list(tmp_path.iterdir()) == []  # the probe is gone, nothing created
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in storage.check_output_dir(str(tmp_path / "file" / "logs" / "run"), 1, "x")
    free = shutil.disk_usage(tmp_path).free
    assert "is nearly full" in storage.check_output_dir(str(tmp_path / "run"), free + (1 << 40), "x")


def test_checkpoint_leftovers_are_never_taken_and_are_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_00000002", "step_00000004", "step_00000006.partial", "step_00000004.superseded"):
        (root / name).mkdir(parents=True)
        (root / name / "mp_rank_00_model_states.pt").write_bytes(b"")
    (root / "latest").write_text("step_00000004")
    (root / "latest.tmp.123").write_text("step_00000006")
    assert [t for _, t in checkpoint.list_checkpoints(str(root))] == ["step_00000002", "step_00000004"]
    assert checkpoint.resolve_resume("latest", str(tmp_path)) == (str(root), "step_00000004")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        checkpoint.resolve_resume(str(root / "step_00000006.partial"), str(tmp_path))
    from dtp_ds.train.export import resolve_checkpoint_dir

    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_checkpoint_dir(str(root / "step_00000006.partial"))
    assert checkpoint.discard_incomplete(str(root)) == ["latest.tmp.123", "step_00000004.superseded",
                                                        "step_00000006.partial"]
    assert sorted(os.listdir(root)) == ["latest", "step_00000002", "step_00000004"]
    # killed while re-saving step 4, between moving the old one aside and renaming the new one in:
    # latest's step 4 is the old (complete) one, taken and then put back; the new one is discarded
    (root / "step_00000004").rename(root / "step_00000004.superseded")
    (root / "step_00000004.partial").mkdir()
    assert checkpoint.resolve_resume("latest", str(tmp_path)) == (str(root), "step_00000004.superseded")
    assert checkpoint.discard_incomplete(str(root)) == ["step_00000004.partial"]
    assert sorted(os.listdir(root)) == ["latest", "step_00000002", "step_00000004"]
    assert checkpoint.resolve_resume("latest", str(tmp_path)) == (str(root), "step_00000004")


def test_pruning_follows_commit_order_after_a_resume_from_an_older_step(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()

    def commit(step: int) -> list[int]:
        work = root / f"step_{step:08d}{checkpoint.PARTIAL}"
        work.mkdir()
        (work / "mp_rank_00_model_states.pt").write_bytes(b"")
        checkpoint._commit(str(root), work.name, f"step_{step:08d}", keep=2)
        return [s for s, _ in checkpoint.list_checkpoints(str(root))]

    for step in (2, 4, 6):
        commit(step)
    assert commit(8) == [6, 8]
    (root / "commits").unlink()  # a run from before the index: its checkpoints count as committed in step order
    assert checkpoint.commit_order(str(root)) == ["step_00000006", "step_00000008"]
    # resumed from step 6: step 8 is the abandoned continuation, pruned first
    assert checkpoint.abandon_newer(str(root), "step_00000006") == ["step_00000008"]
    assert checkpoint.abandon_newer(str(root), "step_00000006") == []  # nothing newer than it any more
    (root / "step_00000006.universal").mkdir()  # a universal copy goes with its checkpoint
    assert commit(7) == [6, 7]
    assert commit(8) == [7, 8]  # the resumed run's own step 8 replaces the abandoned one's
    assert not (root / "step_00000006.universal").exists()
    assert (root / "commits").read_text().split() == ["step_00000007", "step_00000008"]
    assert checkpoint.latest_tag(str(root)) == "step_00000008"


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/dtp_ds_unpickled_marker"


def test_checkpoint_files_are_verified_before_anything_unpickles_them(tmp_path):
    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    torch.save({"module": {"w": torch.ones(2)}, "train_state": {"step": 1}}, ckpt / "mp_rank_00_model_states.pt")
    checkpoint.verify_weights_only(str(ckpt))  # plain weights pass
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    torch.save({"module": {}, "evil": _Exploit()}, ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="will not be unpickled"):
        checkpoint.verify_weights_only(str(ckpt))
    assert not os.path.exists(MARKER)


def test_metrics_survive_a_line_cut_off_by_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + json.dumps({"step": 2, "loss": 0.9}) + "\n"
                    + '{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2]
    logger = MetricsLogger(str(tmp_path), True, resume_step=1)
    logger.log({"step": 2, "loss": 0.8, "src": "https://u:pw123456@h/x.tar"})
    rows = read_metrics(str(path))
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["src"] == f"https://u:{MASK}@h/x.tar"


def test_secrets_are_redacted(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k-0123456789")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a secret: "tokenizers" is not "token"
    text = ("https://bob:hunter22@h/a.tar pipe:env HF_TOKEN=hf_abc123 curl -H 'Authorization: Bearer eyJabcdef' "
            "s3://b/x?X-Amz-Signature=abcd&X-Amz-Date=1 --password p4ss k-0123456789 hf_tokenizer_name=bert")
    clean = redact(text)
    for secret in ("hunter22", "hf_abc123", "eyJabcdef", "abcd&", "p4ss", "k-0123456789"):
        assert secret not in clean, (secret, clean)
    assert "X-Amz-Date=1" in clean and "hf_tokenizer_name=bert" in clean
    obj = redact_obj({"db_password": "x" * 8, "overrides": [{"key": "train_batch_size"}], "cmd": ["k-0123456789"]})
    assert obj == {"db_password": MASK, "overrides": [{"key": "train_batch_size"}], "cmd": [MASK]}
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "shard %s failed", ("https://u:pw1234@h",), None)
    RedactingFilter().filter(record)
    assert record.getMessage() == f"shard https://u:{MASK}@h failed"


def test_one_line_error_from_a_dataloader_worker():
    from dtp_ds.train.redact import one_line as _one_line

    e = sh.DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                     '  File "x.py", line 1, in run\ndtp_ds.data.shards.DataError: 2000 bad items in a row')
    assert _one_line(e) == "2000 bad items in a row"


def _shell_uses(path: Path) -> list[str]:
    """Calls that hand a string to a shell: os.system/os.popen, subprocess with shell=True (except
    where the line before says ``# shell: the user's own pipe: command``: a pipe: shard is a shell
    line by definition, and webdataset runs it so)."""
    found = []
    text = path.read_text()
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text, str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
            found.append(f"{path}:{node.lineno}: {name}")
        for kw in node.keywords:
            if "# shell: the user's own pipe: command" in lines[node.lineno - 2]:
                continue
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"{path}:{node.lineno}: {name}(shell=...)")
    return found


def test_no_shell_command_lines_are_built_from_paths_or_configs():
    """Training, data, eval, export and the tools run subprocesses with argument lists only.
    (dtp_ds/launch, which builds remote command lines for ssh/pdsh, validates hostnames itself.)"""
    files = [p for p in (REPO / "dtp_ds").rglob("*.py") if "launch" not in p.parts]
    files += [p for p in (REPO / "tools").iterdir()
              if p.is_file() and p.read_text().startswith("#!/usr/bin/env python")]
    assert len(files) > 20
    assert [u for f in files for u in _shell_uses(f)] == []


# One process, world size 1: the guard around a real engine (ZeRO-0 fp32: the plain torch
# optimizer dtp_ds guards itself; ZeRO-0 fp16: the loss scale the guard applies). Its
# per-micro-batch calls run under a dispatch mode that fails on ``_local_scalar_dense``, the
# op every ``.item()`` / ``bool()`` / ``float()`` of a tensor goes through.
GUARD_MICRO_BATCH = r"""
import json, logging, os
import deepspeed, torch
from deepspeed.accelerator import get_accelerator
from torch.utils._python_dispatch import TorchDispatchMode
from dtp_ds.train.guard import NonFiniteGuard

class NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("a host synchronisation in the per-micro-batch path")
        return func(*args, **(kwargs or {}))

def _grads(engine, loss):
    engine.backward(loss)
    grads = [p.grad.clone() for p in engine.module.parameters()]
    engine.zero_grad()
    return grads

deepspeed.utils.logger.setLevel(logging.ERROR)
from dtp_ds.cluster.process_group import init_process_group
init_process_group(dist_backend="gloo")
get_accelerator().is_fp16_supported = lambda: True  # emulated fp16, as DTP_DS_ALLOW_EMULATED_FP16=1 does
out = {}
for precision in ("fp32", "fp16"):
    torch.manual_seed(0)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 0},
           "fp16": {"enabled": precision == "fp16", "initial_scale_power": 4},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=torch.nn.Linear(4, 1), model_parameters=None, config=cfg)
    guard = NonFiniteGuard(engine, precision, 5, 0, "unused")
    x = torch.rand(4, 4, dtype=next(engine.module.parameters()).dtype)
    rows = []
    for step in (1, 2):  # DTP_DS_FAULT_NONFINITE=2: +inf in step 2's loss
        with NoHostSync():
            loss = guard.loss(engine(x).float().pow(2).mean(), step)
            back = guard.backward_loss(loss)
        grads = _grads(engine, back)
        plain = _grads(engine, engine(x).float().pow(2).mean() * guard._scale)
        rows.append({"finite": [bool(torch.isfinite(g).all()) for g in grads],
                     "nan": [bool(torch.isnan(g).all()) for g in grads],
                     "same_as_plain": all(torch.equal(g, p) for g, p in zip(grads, plain)), "scale": guard._scale})
    out[precision] = rows
print("RESULT " + json.dumps(out))
"""


def test_the_nonfinite_guard_never_synchronises_per_micro_batch():
    """The guard's per-micro-batch calls (fault hook, what to back-propagate) read no tensor
    on the host, and still turn a non-finite loss into NaN gradients (which DeepSpeed's
    collective check then skips on every rank) and leave a finite one's gradients as they are."""
    import subprocess
    import sys

    from dtp_ds.launch.discovery import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", faults.NONFINITE_ENV: "2"}
    proc = subprocess.run([sys.executable, "-c", GUARD_MICRO_BATCH], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for precision, (finite, inf) in out.items():
        assert all(finite["finite"]) and finite["same_as_plain"], (precision, finite)
        assert all(inf["nan"]), (precision, inf)
    assert out["fp32"][0]["scale"] == 1.0 and out["fp16"][0]["scale"] == 16.0  # the fp16 path scaled


def _caption_stage(image, sample):
    return torch.zeros(3, 4, 4), torch.zeros(4, dtype=torch.long) + len(sample["txt"])


_caption_stage.keys = ("txt",)


def test_bad_items_of_a_pass_that_ends_mid_batch_are_counted(tmp_path):
    """One shard of 3 good samples and 1 without a caption, batches of 2: every pass of the
    pipeline yields one batch and ends with a good sample left over, and wherever the shuffle
    puts the bad one, it is counted (in that batch, or carried into the next pass's)."""
    write_synthetic_dataset(tmp_path, num_train=4, samples_per_shard=4, val_per_class=0, image_size=32, seed=0)
    (shard,) = sorted((tmp_path / "train").glob("*.tar"))
    corrupt.drop_captions(shard, 1)
    passes = 20
    plan = sh.plan_epoch(2 * passes, micro_batch=2, world_size=1, workers=0, accum=1)
    totals = []
    for seed in range(8):  # each seed shuffles a pass differently (every pass the same way)
        loader = sh.make_train_loader(sh.DataConfig(workers=0), [str(shard)], plan, _caption_stage, 2, epoch=0,
                                      seed=seed, rank=0, world_size=1)
        counts = [bad.counts.get("no_caption", 0) for _, _, bad in loader]
        assert len(counts) == passes
        totals.append(sum(counts))
    # the last pass's bad sample is not counted when it comes after that pass's (last) batch
    assert all(t in (passes - 1, passes) for t in totals), totals
