"""``tools/evaluate``: score a trained model without training.

    tools/evaluate LOGS/NAME --zeroshot data/synth/zeroshot [--retrieval 'coco/{00000..00004}.tar'] [--out r.json]
    tools/evaluate LOGS/NAME/checkpoints/step_N --imagenet-val /data/imagenet/val
    tools/evaluate model.safetensors --zeroshot DIR
    tools/evaluate ViT-B-32 --pretrained open_clip_pytorch_model.bin --retrieval SHARDS

The model comes from a run directory (the checkpoint its ``checkpoints/latest`` names), one
checkpoint directory (any ZeRO stage and precision: :mod:`dtp_ds.train.export`), a file
``tools/export_checkpoint`` wrote, or an open_clip model name (any registered one: open_clip's
and dtp_ds's) with its weights (``--pretrained FILE`` or an open_clip pretrained tag).

What is measured is what training logs, by the same functions:

- zero-shot classification (:func:`dtp_ds.eval.zeroshot.evaluate_splits`, the function
  behind training's periodic evaluation: row keys ``zeroshot_*`` for the first split,
  ``NAME_*`` for the others): class-folder splits with ``classnames.json`` and
  ``templates.json`` (``--zeroshot``), ImageNet-1k val as 1000 wnid folders (or flat with the
  devkit beside it) with open_clip's class names and the OpenAI templates (``--imagenet-val``);
  for models whose reducer groups patches (DRIP) also the groups' compression, purity and
  probability spread;
- image-text retrieval (:mod:`dtp_ds.eval.retrieval`): recall@1/5/10 both ways on WebDataset
  shards with one or more captions per image (``--retrieval``; keys ``retrieval_*``);
- kNN classification (:func:`dtp_ds.eval.knn.knn_eval`, the SSL tasks' evaluation: keys
  ``knn_*``) of ``--knn`` splits against ``--knn-bank``; for kNN alone any task's run,
  checkpoint or export is accepted (its image model's pooled embedding).

Given a run (or one of its checkpoints) and no split, the run's own splits are evaluated
(``--imagenet-val`` or ``--zeroshot-data``, then ``--zeroshot-extra``, from its ``config.json``),
and by default as its evaluation ran: the checkpoint's precision (weights and inputs), the
run's evaluation batch (2 x the micro-batch), its ``--eval-max-images`` and, in one
process, its images split as its ranks split them (``--as-ranks``), so the batches are the
run's: the last evaluation row is reproduced, not just approximated.

Under a launcher (``deepspeed --num_gpus N tools/evaluate ...``, ``torchrun tools/evaluate``, MPI,
Slurm) the ranks share the images and the counts / features are gathered; rank 0 prints and
writes.

Loading checkpoints is :mod:`dtp_ds.train`'s (a layer above this one): :func:`main` takes the
reader (``dtp_ds.train.export``) from its caller, the executables.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import open_clip
import torch
import torch.distributed as dist
from torch import nn

import dtp_ds  # noqa: F401  (registers the dtp_ds model names with open_clip)
from dtp_ds.data.shards import DataError
from dtp_ds.eval.boundaries import val_transform
from dtp_ds.eval.classify import ClassSplit, class_split
from dtp_ds.eval.knn import knn_eval
from dtp_ds.eval.linear_probe import eval_transform
from dtp_ds.eval.retrieval import KS, RetrievalSet, retrieval_eval, retrieval_set
from dtp_ds.eval.retrieval import describe as describe_retrieval
from dtp_ds.eval.zeroshot import ZeroShotSplit, check_split, evaluate_splits, folder_split, imagenet_split
from dtp_ds.models.registry import renamed_model

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SOURCES = ("a run directory (LOGS/NAME), a checkpoint directory (LOGS/NAME/checkpoints/step_N), a file "
           "tools/export_checkpoint wrote (.safetensors), or an open_clip model name with --pretrained FILE")


class EvaluateError(Exception):
    """What the user gave cannot be evaluated; the message (one line) names the fix."""


@dataclass
class Source:
    """The model to evaluate and where it came from."""

    model: nn.Module
    name: str  # the open_clip model name (its tokenizer's)
    kind: str  # run, checkpoint, export, open_clip
    path: str  # checkpoint directory, file, or the pretrained weights
    step: int | None = None
    precision: str | None = None  # what the weights were trained / exported in, where known
    run: dict[str, Any] | None = None  # config.json of the run the checkpoint belongs to
    info: dict[str, Any] = field(default_factory=dict)


def _precision_of(ds_config: dict[str, Any] | None) -> str | None:
    if not ds_config:
        return None
    for key in ("bf16", "fp16"):
        if (ds_config.get(key) or {}).get("enabled"):
            return key
    return "fp32"


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class _QuietFreshInit(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly": the weights are
    loaded from the checkpoint right after the model is built."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def _load_checkpoint(path: str, checkpoints: ModuleType, any_task: bool = False) -> Source:
    ckpt_dir = checkpoints.resolve_checkpoint_dir(path)
    states = checkpoints.read_model_states(ckpt_dir)
    task = states.get("task") or "clip"
    if task != "clip" and not any_task:
        raise EvaluateError(f"{ckpt_dir}: a --task {task} checkpoint (an image classifier, no text tower): tools/"
                            f"evaluate scores CLIP models; its validation top-1 is in the run's metrics.jsonl "
                            f"(val_top1), and tools/export_checkpoint exports it")
    quiet = _QuietFreshInit()
    logging.getLogger().addFilter(quiet)  # (open_clip logs through the root logger)
    try:
        model, name = checkpoints.load_model_from_checkpoint(ckpt_dir)
    finally:
        logging.getLogger().removeFilter(quiet)
    run_dir = os.path.dirname(os.path.dirname(ckpt_dir))
    run = _read_json(os.path.join(run_dir, "config.json"))
    step = (states.get("train_state") or {}).get("step")
    precision = _precision_of(states.get("ds_config")) or _precision_of((run or {}).get("ds_config"))
    given = os.path.abspath(path).rstrip("/")
    return Source(model, name, "checkpoint" if given == ckpt_dir else "run", ckpt_dir, step, precision, run)


def _load_export(path: str, checkpoints: ModuleType, any_task: bool = False) -> Source:
    meta = checkpoints.exported_metadata(path)
    if meta.get("task") not in (None, "", "clip") and not any_task:
        raise EvaluateError(f"{path}: an exported --task {meta['task']} model (an image classifier, no text tower): "
                            f"tools/evaluate scores CLIP models")
    model = checkpoints.load_exported(path)
    step = int(meta["step"]) if meta.get("step", "").isdigit() else None
    return Source(model, meta["model_name"], "export", os.path.abspath(path), step, meta.get("dtype"),
                  info={"checkpoint": meta.get("checkpoint")})


def load_source(source: str, pretrained: str | None, checkpoints: ModuleType, any_task: bool = False) -> Source:
    """The model ``source`` names (see the module doc), fp32, in eval mode, on the CPU.
    ``any_task``: a checkpoint or export of any task (its model as the task built it: an image
    trunk for classify and the SSL tasks), not only CLIP's (for image-only evaluations)."""
    if pretrained is not None:
        if os.path.exists(source):
            raise EvaluateError(f"{source} is a file or directory: --pretrained goes with an open_clip model name "
                                f"(a checkpoint or an export carries its own weights): drop --pretrained")
        if source not in open_clip.list_models() and not source.startswith(("hf-hub:", "local-dir:")):
            raise EvaluateError(renamed_model(source) or
                                f"{source}: not an open_clip model name (open_clip.list_models() lists them, "
                                f"dtp_ds's among them after `import dtp_ds`); give the architecture's name with "
                                f"--pretrained")
        try:
            model = open_clip.create_model(source, pretrained=pretrained)
        except RuntimeError as e:  # open_clip: unknown tag / file
            raise EvaluateError(f"{source} --pretrained {pretrained}: {e}; give a weights file or one of the "
                                f"model's pretrained tags (open_clip.list_pretrained_tags_by_model)") from e
        return Source(model.eval(), source, "open_clip", pretrained)
    if os.path.isdir(source):
        return _load_checkpoint(source, checkpoints, any_task)
    if os.path.isfile(source):
        if not source.endswith(".safetensors"):
            raise EvaluateError(f"{source}: a file that is not a .safetensors export; for open_clip weights give the "
                                f"model name and --pretrained {source} (e.g. `ViT-B-32 --pretrained {source}`)")
        return _load_export(source, checkpoints, any_task)
    if source in open_clip.list_models() or source.startswith(("hf-hub:", "local-dir:")):
        raise EvaluateError(f"{source} is a model name without weights: give them with --pretrained FILE (or an "
                            f"open_clip pretrained tag), or evaluate a run directory, checkpoint or export instead")
    raise EvaluateError(renamed_model(source) or
                        f"{source}: no such file or directory, and not an open_clip model name; give {SOURCES}")


def _split(path: str, flag: str) -> ZeroShotSplit:
    if not os.path.isdir(path):
        raise EvaluateError(f"{flag} {path}: not a directory; give a class-folder split (CLASS/IMAGE.jpg folders "
                            f"with classnames.json and templates.json, as tools/make_synthetic_shards writes)")
    if flag == "--imagenet-val":
        try:  # wnid folders, or flat files with the devkit beside them
            split = imagenet_split(path)
        except DataError as e:
            raise EvaluateError(f"{flag}: {e}") from e
    else:
        missing = [f for f in ("classnames.json", "templates.json") if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise EvaluateError(f"{flag} {path}: no {' or '.join(missing)} (a class-folder split needs its class "
                                f"names, in sorted folder order, and prompt templates with {{}}); for ImageNet's "
                                f"val in wnid folders use --imagenet-val {path}")
        split = folder_split(path)
    try:
        check_split(split)
    except ValueError as e:
        fix = ("ImageNet-1k's val as its 1000 wnid folders (n01440764/, ...; tools/prepare_imagenet sorts the flat "
               "val images into them by the devkit's ground truth), or the flat ILSVRC2012_val_*.JPEG files with "
               "ILSVRC2012_devkit_t12.tar.gz beside them" if flag == "--imagenet-val"
               else "one class name per class folder")
        raise EvaluateError(f"{flag}: {e}; give {fix}") from e
    return split


@dataclass
class Plan:
    """What to evaluate, how."""

    zeroshot: list[ZeroShotSplit]
    retrieval: list[RetrievalSet]
    precision: str
    batch_size: int
    max_images: int | None
    retrieval_max_images: int | None
    as_ranks: int | None
    workers: int
    notes: list[str]
    knn: list[ClassSplit] = field(default_factory=list)  # splits kNN-classified against knn_bank
    knn_bank: ClassSplit | None = None
    knn_bank_max_images: int | None = None


def make_plan(a: argparse.Namespace, src: Source, world: int) -> Plan:
    """The splits and settings: the flags, else the run's (see the module doc)."""
    run = src.run or {}
    saved = run.get("args") or {}
    # the run's settings: the task's (task_config) over the run section (where runs before the
    # task seam kept the zero-shot splits and --zeroshot-max-images)
    run_args = {**(saved.get("run") or {}), **(saved.get("task_config") or {})}
    notes = []
    zeroshot = ([_split(a.imagenet_val, "--imagenet-val")] if a.imagenet_val else []) + \
        [_split(d, "--zeroshot") for d in a.zeroshot or []]
    try:
        retrieval = [retrieval_set(s) for s in a.retrieval or []]
    except DataError as e:
        raise EvaluateError(f"--retrieval: {e}") from e
    knn, knn_bank = [], None
    if a.knn:
        if not a.knn_bank:
            raise EvaluateError("--knn needs --knn-bank: the labelled training images the splits are compared with")
        try:
            knn, knn_bank = [class_split(p) for p in a.knn], class_split(a.knn_bank)
        except (ValueError, DataError) as e:
            raise EvaluateError(f"--knn / --knn-bank: {e}") from e
    elif a.knn_bank:
        raise EvaluateError("--knn-bank without --knn: give the splits to classify with --knn DIR|SHARDS ...")
    own = not zeroshot and not retrieval and not knn and bool(run)
    if own:
        first = ([("--imagenet-val", run_args["imagenet_val"])] if run_args.get("imagenet_val") else
                 [("--zeroshot", run_args["zeroshot_data"])] if run_args.get("zeroshot_data") else [])
        wanted = first + [("--zeroshot", d) for d in run_args.get("zeroshot_extra") or []]
        gone = [d for _, d in wanted if not os.path.isdir(d)]
        if gone:
            raise EvaluateError(f"the run's evaluation splits are not here ({', '.join(gone)}; paths as the run was "
                                f"started): give them with --zeroshot DIR / --imagenet-val DIR")
        zeroshot = [_split(d, flag) for flag, d in wanted]
        if zeroshot:
            notes.append("the run's splits: " + ", ".join(d for _, d in wanted))
    if not zeroshot and not retrieval and not knn:
        raise EvaluateError("nothing to evaluate: give --zeroshot DIR, --imagenet-val DIR, --retrieval SHARDS or "
                            "--knn DIR --knn-bank DIR")
    precision = a.precision
    if precision == "auto":
        precision = src.precision if src.precision in PRECISIONS else "fp32"
        if src.precision:
            notes.append(f"precision {precision} (the {'export' if src.kind == 'export' else 'run'}'s)")
    micro = (run.get("ds_config") or {}).get("train_micro_batch_size_per_gpu")
    batch_size = a.batch_size or (2 * int(micro) if micro else 64)
    if not a.batch_size and micro:
        notes.append(f"batch {batch_size} (the run's evaluation batch)")
    max_images = a.max_images
    run_max = run_args.get("eval_max_images", run_args.get("zeroshot_max_images"))
    if max_images is None and run_max:
        max_images = run_max
        notes.append(f"at most {max_images} images per split (the run's --eval-max-images)")
    as_ranks = a.as_ranks
    if world > 1:
        if as_ranks not in (None, world):
            raise EvaluateError(f"--as-ranks {as_ranks} under a launch of {world} ranks: drop it (the ranks split "
                                f"the images themselves)")
        as_ranks = None
    elif as_ranks is None and run.get("world_size", 1) > 1 and zeroshot:
        as_ranks = int(run["world_size"])
        notes.append(f"images split as the run's {as_ranks} ranks split them")
    return Plan(zeroshot, retrieval, precision, batch_size, max_images or None,
                a.retrieval_max_images or None, as_ranks if (as_ranks or 1) > 1 else None, a.workers, notes,
                knn, knn_bank, a.knn_bank_max_images)


def evaluate(src: Source, plan: Plan, device: torch.device) -> dict[str, Any]:
    """Run the plan on every rank: the report (``row``: the flat metrics with training's keys)."""
    dtype = PRECISIONS[plan.precision]
    model = src.model.to(device=device, dtype=dtype).eval()
    text = plan.zeroshot or plan.retrieval  # (an image trunk of another task has no text tower)
    tokenizer = open_clip.get_tokenizer(src.name) if text else None
    preprocess = val_transform(model) if text else None
    row: dict[str, Any] = {}
    lines: list[str] = []
    zeroshot: dict[str, Any] = {}
    retrieval: dict[str, Any] = {}
    if plan.zeroshot:  # training's evaluation (dtp_ds.tasks.clip: CLIPTask.evaluate)
        row, lines, results = evaluate_splits(model, tokenizer, preprocess, plan.zeroshot, device, dtype,
                                              batch_size=plan.batch_size, max_images=plan.max_images,
                                              workers=plan.workers, as_ranks=plan.as_ranks)
        zeroshot = {split.name: {"dir": split.image_dir, **{k.removeprefix("zeroshot_"): v for k, v in one.items()}}
                    for split, one in zip(plan.zeroshot, results)}
    for i, rset in enumerate(plan.retrieval):
        prefix = "retrieval_" if i == 0 else f"retrieval_{rset.name}_"
        one = retrieval_eval(model, tokenizer, preprocess, rset, device, dtype, batch_size=plan.batch_size,
                             max_images=plan.retrieval_max_images, workers=plan.workers, prefix=prefix)
        row.update(one)
        lines.append(describe_retrieval(rset.name, one, prefix))
        retrieval[rset.name] = {"shards": len(rset.shards), **{k.removeprefix(prefix): v for k, v in one.items()}}
    knn: dict[str, Any] = {}
    for i, split in enumerate(plan.knn):  # the SSL tasks' evaluation (dtp_ds.tasks.ssl: SSLTask.evaluate)
        prefix = "knn_" if i == 0 else f"{split.name}_knn_"
        one = knn_eval(model, eval_transform(model), plan.knn_bank, split, device, dtype, plan.batch_size,
                       plan.max_images, plan.workers, bank_max_images=plan.knn_bank_max_images, prefix=prefix)
        row.update(one)
        lines.append(f"knn {split.name}: top-1 {one[prefix + 'top1']:.2f}% top-5 {one[prefix + 'top5']:.2f}% "
                     f"(chance {one[prefix + 'chance_top1']:.2f}%; bank of {one[prefix + 'bank']})")
        knn[split.name] = {k.removeprefix(prefix): v for k, v in one.items()}
    return {"model": src.name, "source": src.kind, "path": src.path, "step": src.step, **src.info,
            "precision": plan.precision, "batch_size": plan.batch_size, "max_images": plan.max_images,
            "as_ranks": plan.as_ranks, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "device": str(device), "notes": plan.notes, "zeroshot": zeroshot, "retrieval": retrieval, "knn": knn,
            "row": row, "lines": lines}


def _fmt(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    out = ["  ".join(h.ljust(w) if c == 0 else h.rjust(w) for c, (h, w) in enumerate(zip(header, widths)))]
    out += ["  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))) for r in rows]
    return out


def format_report(report: dict[str, Any]) -> str:
    """The report as tables (zero-shot splits, retrieval sets) under a header line."""
    step = f" (step {report['step']})" if report.get("step") is not None else ""
    out = [f"{report['model']} from {report['path']}{step}: {report['precision']}, batch {report['batch_size']}"
           + (f", as {report['as_ranks']} ranks" if report.get("as_ranks") else "")
           + (f", {report['world_size']} ranks" if report["world_size"] > 1 else "")]
    out += [f"  {n}" for n in report["notes"]]
    if report["zeroshot"]:
        drip = any("compression" in r for r in report["zeroshot"].values())
        header = ["zero-shot", "top-1", "top-5", "chance", "images", "classes"]
        header += ["compression", "purity", "even", "p spread"] if drip else []
        rows = []
        for name, r in report["zeroshot"].items():
            row = [name, _fmt(r["top1"]), _fmt(r["top5"]), _fmt(r["chance_top1"]), str(r["images"]), str(r["classes"])]
            if drip:
                row += [_fmt(r.get("compression")), _fmt(r.get("purity"), 3), _fmt(r.get("purity_even"), 3),
                        _fmt(r.get("prob_spread"), 3)]
            rows.append(row)
        out += [""] + _table(header, rows)
    if report["retrieval"]:
        drip = any("compression" in r for r in report["retrieval"].values())
        header = ["retrieval", "images", "captions"] + [f"i->t R@{k}" for k in KS] + [f"t->i R@{k}" for k in KS]
        header += ["mean", "unusable"] + (["compression"] if drip else [])
        rows = [[name, str(r["images"]), str(r["texts"]), *[_fmt(r[f"image_to_text_r{k}"]) for k in KS],
                 *[_fmt(r[f"text_to_image_r{k}"]) for k in KS], _fmt(r["mean_recall"]), str(r["unusable"]),
                 *([_fmt(r.get("compression"))] if drip else [])] for name, r in report["retrieval"].items()]
        out += [""] + _table(header, rows)
    if report.get("knn"):
        rows = [[name, _fmt(r["top1"]), _fmt(r["top5"]), _fmt(r["chance_top1"]), str(r["images"]), str(r["bank"])]
                for name, r in report["knn"].items()]
        out += [""] + _table(["kNN (k 20, T 0.07)", "top-1", "top-5", "chance", "images", "bank"], rows)
    return "\n".join(out)


def start_ranks(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device): a process group when a launcher (or MPI / Slurm) started
    several processes, else one process on ``device`` (default: the GPU if there is one)."""
    from dtp_ds.launch.discovery import DiscoveryError, discover

    env = dict(os.environ)
    try:
        discover(env)
    except DiscoveryError as e:
        raise EvaluateError(str(e)) from e
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from dtp_ds.cluster.process_group import init_process_group

    os.environ.update(env)
    with contextlib.redirect_stdout(sys.stderr):  # deepspeed's import prints; stdout is the report's
        init_process_group()
    local = int(env.get("LOCAL_RANK", "0"))
    if device is None and torch.cuda.is_available():
        torch.cuda.set_device(local)
        return dist.get_rank(), world, torch.device("cuda", local)
    return dist.get_rank(), world, torch.device(device or "cpu")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate",
        description="Zero-shot classification and image-text retrieval of a CLIP model: a dtp_ds run or checkpoint, "
                    "an export, or an open_clip model with its weights. Prints a table; --out writes JSON.")
    p.add_argument("source", help=f"what to evaluate: {SOURCES}")
    p.add_argument("--pretrained", help="with a model name: its weights (a file, or an open_clip pretrained tag)")
    p.add_argument("--zeroshot", nargs="+", metavar="DIR",
                   help="class-folder splits with classnames.json and templates.json (the first logged as zeroshot_*, "
                        "the others as NAME_*, as in training)")
    p.add_argument("--imagenet-val", metavar="DIR",
                   help="ImageNet-1k val as 1000 wnid class folders (tools/prepare_imagenet makes them), or the "
                        "flat files with ILSVRC2012_devkit_t12.tar.gz beside them: open_clip's class names, the "
                        "OpenAI templates")
    p.add_argument("--knn", nargs="+", metavar="DIR|SHARDS",
                   help="splits (class folders or cls shards) classified by their nearest neighbours in --knn-bank "
                        "(DINO's weighted kNN, k 20, T 0.07: what the SSL tasks log as knn_top1); any task's run, "
                        "checkpoint or export (its image model's pooled embedding)")
    p.add_argument("--knn-bank", metavar="DIR|SHARDS", help="the labelled training images --knn compares with")
    p.add_argument("--knn-bank-max-images", type=int, help="the first N images of --knn-bank (default all)")
    p.add_argument("--retrieval", nargs="+", metavar="SHARDS",
                   help="image-text shards ('DIR/{00000..00004}.tar' or a directory of .tar): jpg + txt with one "
                        "caption a line, or json with a 'captions' list; recall@1/5/10 both ways")
    p.add_argument("--out", help="write the report as JSON to this file")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                   help="weights and inputs (default: the checkpoint's training precision, an export's dtype, "
                        "else fp32)")
    p.add_argument("--batch-size", type=int, help="images per forward (default: the run's evaluation batch, else 64)")
    p.add_argument("--max-images", type=int,
                   help="zero-shot images per split (default: the run's --eval-max-images, else all; 0: all)")
    p.add_argument("--retrieval-max-images", type=int, help="the first N samples of each retrieval set (default all)")
    p.add_argument("--as-ranks", type=int,
                   help="one process: split the zero-shot images as N ranks do, so the batches are a run of N ranks' "
                        "(default: the run's world size); 1: one batch sequence")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (results do not depend on it)")
    p.add_argument("--device",
                   help="torch device (default: cuda if available, under a launcher cuda:LOCAL_RANK; else cpu)")
    # the deepspeed launcher's (it also sets LOCAL_RANK, which is what is read)
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, checkpoints: ModuleType | None = None) -> int:
    """The CLI. ``checkpoints``: the checkpoint reader (``dtp_ds.train.export``), given by the
    executables (the layer above this one)."""
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    errors: tuple[type[BaseException], ...] = (EvaluateError, FileNotFoundError, ValueError, OSError)
    if checkpoints is not None and isinstance(getattr(checkpoints, "CheckpointError", None), type):
        errors += (checkpoints.CheckpointError,)
    rank = 0
    try:
        if checkpoints is None and (os.path.exists(a.source) and a.pretrained is None):
            raise EvaluateError(f"{a.source}: reading checkpoints needs dtp_ds.train's reader: run tools/evaluate "
                                f"(or deepspeed tools/evaluate on several ranks)")
        rank, world, device = start_ranks(a.device)
        image_only = bool(a.knn) and not (a.zeroshot or a.imagenet_val or a.retrieval)
        src = load_source(a.source, a.pretrained, checkpoints, any_task=image_only)
        plan = make_plan(a, src, world)
        with contextlib.redirect_stdout(sys.stderr):  # a first deepspeed import prints: stdout is the report's
            import deepspeed  # noqa: F401  (the zero-shot evaluation imports it)
        report = evaluate(src, plan, device)
    except errors as e:  # DataError is a ValueError
        if rank == 0:
            print(f"evaluate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if rank == 0:
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            tmp = f"{a.out}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1)
                f.write("\n")
            os.replace(tmp, a.out)
        print(json.dumps(report, indent=1) if a.json else format_report(report), flush=True)
    return 0
