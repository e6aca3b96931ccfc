"""Boundary-predictor ablation on the synthetic data (``tools/boundary_ablation``).

Each arm is one real ``dtp_ds.train`` run per seed (the ``deepspeed`` launcher, same data,
ds_config, steps, global batch; ``--seeds N`` seeds, each changing initialisation and data order,
shared by every arm); arms differ only in the DRIP reducer's ``predictor`` options, plus evenly
spaced boundaries at the same compression (``predictor: fixed``) and the plain ViT. Each trained
MLP predictor is then also evaluated under every evaluation rule. Printed per column:
``mean +- half-width (n)`` over seeds (95% t interval, :mod:`dtp_ds.bench.stats`): eval
compression and its gap to the training compression, segment purity against evenly spaced
boundaries at the same count, the spread of boundary probabilities, zero-shot top-1 / top-5 on
the shapes split and on the layout split; then each arm's paired difference to ``--reference``
and whether it separates. ``rows.json``: per arm (``ARM/RULE`` for the re-evaluations) the
per-seed values, ``*_mean``, ``*_ci95``, ``*_diff_mean``, ``*_diff_ci95``, ``*_separated``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import open_clip
import torch

from dtp_ds.bench import markdown_table, reuse
from dtp_ds.bench.stats import compare, per_seed_table, separation_lines
from dtp_ds.cluster.ports import free_port
from dtp_ds.eval.boundaries import val_transform
from dtp_ds.eval.zeroshot import folder_split, with_prefix, zero_shot_eval
from dtp_ds.models import get_model_config, reducers_of
from dtp_ds.models.boundary import EVAL_RULES
from dtp_ds.models.registry import upgrade_vision_cfg
from dtp_ds.train.export import load_model_from_checkpoint
from dtp_ds.train.metrics import read_metrics
from dtp_ds.train.runs import finished_as, launch_command

BASE_MODEL = "DRIP-ViT-Tiny-8-4x"
PLAIN_MODEL = "ViT-Tiny-8"
# arm -> reducer_cfg overrides of the shipped tiny config (None: the plain ViT); "shipped" is as shipped
ARMS: dict[str, dict[str, Any] | None] = {
    # DTP as published: the MLP on the tokens after the pre blocks
    "mlp-cumsum": {"predictor": "mlp", "predictor_input": "tokens", "straight_through": "cumsum"},
    "mlp-confidence": {"predictor": "mlp", "predictor_input": "tokens", "straight_through": "confidence"},
    "cosine": {"predictor": "cosine", "predictor_input": "tokens", "selection": "threshold", "tied": False},
    "cosine-embed-topk": {"predictor": "cosine", "predictor_input": "embed", "selection": "topk", "tied": False},
    "shipped": {},
    "fixed-even": {"predictor": "fixed"},
    "plain-vit": None,
}
COLUMNS = [("arm", "arm", "{}"), ("train_compression", "train compr", "{:.2f}"),
           ("zeroshot_compression", "eval compr", "{:.2f}"), ("gap", "gap", "{:+.1%}"),
           ("zeroshot_purity", "purity", "{:.3f}"), ("zeroshot_purity_even", "even purity", "{:.3f}"),
           ("zeroshot_purity_by_patch", "by patch", "{:.3f}"), ("zeroshot_purity_by_patch_even", "even", "{:.3f}"),
           ("zeroshot_prob_spread", "p spread", "{:.3f}"), ("zeroshot_top1", "shapes top-1", "{:.1f}"),
           ("zeroshot_top5", "top-5", "{:.1f}"), ("layout_top1", "layout top-1", "{:.1f}"),
           ("layout_top5", "top-5", "{:.1f}")]


def write_arm_config(arm: str, overrides: dict[str, Any], base: str, out_dir: str) -> str:
    cfg = copy.deepcopy(get_model_config(base))
    cfg["vision_cfg"] = upgrade_vision_cfg(cfg["vision_cfg"])  # a shipped drip_cfg -> reducer_cfg
    cfg["vision_cfg"]["reducer_cfg"].update(overrides)
    path = os.path.join(out_dir, "configs", f"{base}-abl-{arm}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    return path


def add_arm_run_args(p: argparse.ArgumentParser, arms: list[str], out: str, reference: str | None = None) -> None:
    """The options every arm-by-arm tool shares (this one, ``compare_reducers``): where the data
    and the runs are, which arms, the seeds, and the one recipe every arm trains with."""
    p.add_argument("--data", default="data/synth", help="made by tools/make_synthetic_shards")
    p.add_argument("--out", default=out, help="runs, configs and the tables go here (default: %(default)s)")
    p.add_argument("--arms", nargs="+", default=arms, choices=arms)
    p.add_argument("--reference", default=reference, choices=arms,
                   help="the arm every other is differenced against, seed by seed (default: %(default)s, or the "
                        "first arm when it is not run)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=128, help="micro-batch per rank")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--seeds", type=int, default=1,
                   help="seeds SEED, SEED+1, ...: each changes initialisation and data order; every arm runs each "
                        "(3 or more for an interval worth reading; default: %(default)s)")
    p.add_argument("--nproc", type=int, default=torch.cuda.device_count() or 2)


def seeds_of(a: argparse.Namespace) -> list[int]:
    if a.seeds < 1:
        raise SystemExit(f"--seeds {a.seeds}: at least 1")
    return [a.seed + i for i in range(a.seeds)]


def reference_of(a: argparse.Namespace) -> str:
    return a.reference if a.reference in a.arms else a.arms[0]


def run_arm(arm: str, model: str, a: argparse.Namespace, extra: list[str], tool: str = "ablation",
            seed: int | None = None) -> dict[str, Any]:
    """Train one arm at ``seed`` by a real run (unless a finished run of it is there whose reuse
    hash matches: the same command line, model / ds_config file contents, threads and code);
    its last evaluation row."""
    seed = a.seed if seed is None else seed
    logs = os.path.join(a.out, "runs")
    name = f"{arm}-s{seed}"
    cmd = launch_command(a.data, logs, name, a.nproc, model,
                         ["--epochs", "1", "--max-steps", str(a.steps), "--batch-size", str(a.batch_size),
                          "--lr", str(a.lr), "--warmup", str(a.warmup), "--log-every-n-steps", "10",
                          "--eval-frequency", "1", "--seed", str(seed), *extra])
    run_dir = os.path.join(logs, name)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // a.nproc)))
    digest = reuse.reuse_hash(cmd[1:], reuse.files_in(cmd), reuse.thread_settings(env))
    if not (finished_as(run_dir, model, cmd) and reuse.reusable(run_dir, digest)):
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished earlier attempt, or another config
        print(f"{tool}: {name}: {' '.join(cmd)}", flush=True)
        # a free rendezvous port: another job on the machine may hold the launcher's default 29500
        if subprocess.call([cmd[0], "--master_port", str(free_port()), *cmd[1:]], env=env) != 0:
            raise SystemExit(f"{tool}: the {name} run failed; see its output above and {run_dir}")
        reuse.record(run_dir, digest, command=cmd, threads=reuse.thread_settings(env))
    rows = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "zeroshot_top1" in r]
    return {"arm": arm, "rule": "-", "seed": seed, "run_dir": run_dir, **rows[-1]}


@torch.no_grad()
def rule_rows(arm: str, run_dir: str, a: argparse.Namespace, train_compression: float) -> list[dict[str, Any]]:
    """The trained MLP predictor evaluated under each evaluation rule (one process)."""
    model, name = load_model_from_checkpoint(run_dir)
    tok = open_clip.get_tokenizer(name)
    preprocess = val_transform(model)
    rows = []
    for rule in EVAL_RULES:
        for r in reducers_of(model):  # the arms are DRIP reducers: their predictor's rule
            r.boundary_predictor.eval_rule = rule
        row: dict[str, Any] = {"arm": arm, "rule": rule, "train_compression": train_compression}
        for i, split in enumerate(("zeroshot", "layout")):
            res = zero_shot_eval(model, tok, preprocess, folder_split(os.path.join(a.data, split)),
                                 torch.device("cpu"), batch_size=128)
            prefix = "zeroshot_" if i == 0 else "layout_"
            row.update(with_prefix(res, prefix))
        rows.append(row)
    return rows


def label(row: dict[str, Any]) -> str:
    """An arm's name in the tables: ``ARM`` for its own run, ``ARM/RULE`` re-evaluated under a rule."""
    return row["arm"] if row.get("rule", "-") == "-" else f"{row['arm']}/{row['rule']}"


def per_seed(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, dict[int, float]]]:
    """``{label: {key: {seed: value}}}`` from per-seed rows (the :func:`compare` input)."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for r in rows:
        if r.get("train_compression") and r.get("zeroshot_compression"):
            r["gap"] = r["zeroshot_compression"] / r["train_compression"] - 1.0
        arm = out.setdefault(label(r), {k: {} for k in keys})
        for k in keys:
            if r.get(k) is not None:
                arm[k][r["seed"]] = float(r[k])
    return out


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    return markdown_table(per_seed_table(summary, COLUMNS), [(k, h, "{}") for k, h, _ in COLUMNS])


KEYS = [k for k, _, _ in COLUMNS if k != "arm"]
SEPARATION = [("zeroshot_top1", "shapes top-1", "{:.1f}"), ("layout_top1", "layout top-1", "{:.1f}"),
              ("zeroshot_purity_by_patch", "purity by patch", "{:.3f}")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="boundary_ablation", description=__doc__.split("\n")[0])
    add_arm_run_args(p, list(ARMS), "logs/boundary_ablation", reference="fixed-even")
    p.add_argument("--json", action="store_true")
    a, extra = p.parse_known_args(argv)
    for split in ("zeroshot", "layout"):
        if not os.path.isfile(os.path.join(a.data, split, "classnames.json")):
            p.error(f"--data {a.data}: no {split}/ split; run tools/make_synthetic_shards --out {a.data}")
    rows = []
    for seed in seeds_of(a):  # seed by seed: an interrupted run leaves whole seeds behind
        for arm in a.arms:
            overrides = ARMS[arm]
            model = PLAIN_MODEL if overrides is None else write_arm_config(arm, overrides, BASE_MODEL, a.out)
            row = run_arm(arm, model, a, extra, seed=seed)
            rows.append(row)
            if overrides and overrides.get("predictor") == "mlp":
                rows += [{**r, "seed": seed} for r in rule_rows(arm, row["run_dir"], a, row.get("train_compression"))]
    summary = compare(per_seed(rows, KEYS), KEYS, reference=reference_of(a))
    table = format_table(summary)
    lines = separation_lines(summary, SEPARATION)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table + "\n\n" + "\n".join(lines) + "\n")
    with open(os.path.join(a.out, "rows.json"), "w") as f:
        json.dump({"seeds": seeds_of(a), "reference": reference_of(a), "arms": summary, "runs": rows}, f, indent=1)
    print(json.dumps(summary, indent=1) if a.json else table + "\n\n" + "\n".join(lines))
    print(f"ablation: {a.steps} steps x global batch {a.batch_size * a.nproc} per arm and seed, seeds "
          f"{seeds_of(a)}; mean +- half-width of the 95% t interval (n seeds); differences paired by seed to "
          f"{reference_of(a)}; eval on {a.data}/zeroshot (shapes) and {a.data}/layout; table in {a.out}/table.md",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
