"""``smartcam-model finetune``: fine-tune a YOLO checkpoint on one camera's teacher-labeled frames (Ultralytics).

Start from ``../shared/models/yolov8n-coco-trainable.pt`` (BatchNorm restored): the fused ``yolov8n-coco.pt``
transfers only 70 of 355 tensors into a training run. Ways to keep the general person knowledge while the model
learns the scene, measured in docs/benchmarks.md (learning loop):

* ``--freeze N``: the first N modules keep their weights (YOLOv8: 0-9 the backbone, 10-21 the neck, 22 the
  head). The default, 22 with ``--lr0 0.0005`` (only the head trains, gently), was the one recipe that improved
  the held-out scene (+1.1 and +1.3 points AP50 in two seeds) without losing on persons-eval;
* ``--general DATA.yaml --general-share S``: a share S of the training images comes from other scenes
  (teacher-labeled too), so the model is not pulled entirely towards one view (needed when the neck trains).

The dataset keeps the teacher's whole class list (labels are class 0, person), so every head weight transfers.
Training runs in ``OUT-run/`` next to ``OUT``; ``--resume`` continues an interrupted run from its ``last.pt``.
Ultralytics prints its own progress bars. CPU here, the first GPU when torch sees one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from camera.sources import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


@dataclass
class Recipe:
    """What a fine-tune did, saved beside the checkpoint as OUT.json."""

    data: str
    base: str
    imgsz: int
    epochs: int
    freeze: int
    general: str | None
    general_share: float
    batch: int
    lr0: float
    mosaic: float
    seed: int
    train_images: int = 0
    general_images: int = 0


def _images_of(data_yaml: Path, split: str) -> list[Path]:
    """Image files of one split of a YOLO data.yaml (a folder, a list of folders, or a .txt list)."""
    cfg = yaml.safe_load(data_yaml.read_text())
    root = Path(cfg.get("path") or data_yaml.parent)
    if not root.is_absolute():
        root = (data_yaml.parent / root).resolve()
    entries = cfg.get(split)
    if entries is None:
        raise ValueError(f"{data_yaml}: no {split!r} split")
    out: list[Path] = []
    for entry in entries if isinstance(entries, list) else [entries]:
        p = Path(entry) if Path(entry).is_absolute() else root / entry
        if p.suffix == ".txt":
            out += [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()]
        elif p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            raise ValueError(f"{data_yaml}: {split} entry {entry} is neither a folder nor a .txt list")
    return out


def mixed_data(data: Path, general: Path | None, share: float, workdir: Path, seed: int = 0) -> tuple[Path, int, int]:
    """A data.yaml whose train list is the scene's images plus general images making up ``share`` of the total
    (validation stays the scene's own); returns it with the scene and general image counts."""
    cfg = yaml.safe_load(data.read_text())
    scene = _images_of(data, "train")
    if not scene:
        raise ValueError(f"{data}: no training images")
    extra: list[Path] = []
    if general is not None and share > 0:
        if not 0 < share < 1:
            raise ValueError(f"general share must be between 0 and 1, got {share}")
        pool = _images_of(general, "train")
        want = round(len(scene) * share / (1 - share))
        if len(pool) < want:
            log.warning("only %d general images for the %d a share of %.2f asks: using all", len(pool), want, share)
        extra = random.Random(seed).sample(pool, min(want, len(pool)))
    workdir.mkdir(parents=True, exist_ok=True)
    listing = workdir / "train.txt"
    listing.write_text("".join(f"{p.resolve()}\n" for p in scene + extra))
    val = _images_of(data, "val")
    val_listing = workdir / "val.txt"
    val_listing.write_text("".join(f"{p.resolve()}\n" for p in (val or scene)))
    out = workdir / "data.yaml"
    out.write_text(yaml.safe_dump({"path": str(workdir.resolve()), "train": str(listing.resolve()),
                                   "val": str(val_listing.resolve()), "names": cfg["names"]}, sort_keys=False))
    return out, len(scene), len(extra)


def finetune(data: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *, imgsz: int = 320,
             epochs: int = 10, freeze: int = 22, general: str | os.PathLike | None = None,
             general_share: float = 0.0, batch: int = 16, lr0: float = 0.0005, mosaic: float = 1.0,
             seed: int = 0, resume: bool = False, device: str | None = None, workers: int = 0) -> Path:
    """Train and write the best checkpoint to ``out`` (+ ``out``.json, the recipe); returns ``out``."""
    try:
        from ultralytics import YOLO
    except ImportError:
        raise RuntimeError("finetune needs ultralytics: pip install 'smartcam[ultralytics]'") from None
    data, base, out = Path(data), Path(base), Path(out)
    if not data.is_file():
        raise FileNotFoundError(f"data.yaml not found: {data}")
    if not base.is_file():
        raise FileNotFoundError(f"base checkpoint not found: {base}")
    run_dir = out.with_name(out.stem + "-run")
    last = run_dir / "train" / "weights" / "last.pt"
    recipe = Recipe(str(data), str(base), imgsz, epochs, freeze, str(general) if general else None, general_share,
                    batch, lr0, mosaic, seed)
    if resume and last.is_file():
        log.info("resuming %s", last)
        YOLO(str(last)).train(resume=True)
    else:
        if resume:
            log.warning("nothing to resume in %s: starting a new run", run_dir)
        mixed, recipe.train_images, recipe.general_images = mixed_data(
            data, Path(general) if general else None, general_share, run_dir / "data", seed)
        if device is None:
            import torch

            device = "0" if torch.cuda.is_available() else "cpu"
        model = YOLO(str(base))
        model.train(data=str(mixed), imgsz=imgsz, epochs=epochs, batch=batch, freeze=freeze or None,
                    lr0=lr0, lrf=0.1, optimizer="AdamW", warmup_epochs=min(1.0, epochs / 5), mosaic=mosaic,
                    close_mosaic=max(0, epochs // 3), seed=seed, deterministic=True, workers=workers,
                    device=device, project=str(run_dir.resolve()), name="train", exist_ok=True, plots=False,
                    pretrained=True, patience=max(epochs, 5), verbose=False, amp=device != "cpu")
    weights = run_dir / "train" / "weights"
    best = weights / "best.pt" if (weights / "best.pt").is_file() else weights / "last.pt"
    if not best.is_file():
        raise RuntimeError(f"training wrote no checkpoint in {weights}")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, out)
    out.with_suffix(".json").write_text(json.dumps(asdict(recipe), indent=2))
    log.info("wrote %s (from %s)", out, best)
    return out
