"""``smartcam-model build``: weights → fp32 ONNX at imgsz → (optional person-only head) → calibrated INT8 QDQ
ONNX + manifest, with the measured accuracy/latency of both recorded in the manifest.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import onnx
from tqdm import tqdm

from camera.detector import ModelError
from models.calibration import check_sources, sample_frames
from models.evaluate import evaluate_accuracy, load_labels, measure_latency
from models.export import fp32_model
from models.head import BATCH_DIM, dynamic_batch, fixed_batch, model_names, slim_classes
from models.imgsz import imgsz_problem
from models.manifest import build_manifest, write_manifest
from models.quantize import QuantSettings, quantize_model

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    model_path: Path
    manifest: dict
    fp32_path: Path | None


def default_out(
    weights: str | os.PathLike, imgsz: tuple[int, int], keep_classes: Sequence[str] | None
) -> Path:
    """``models/<weights stem>[-person]-<imgsz>-int8.onnx`` in the current directory."""
    size = str(imgsz[0]) if imgsz[0] == imgsz[1] else f"{imgsz[0]}x{imgsz[1]}"
    tag = "-" + "-".join(keep_classes) if keep_classes else ""
    return Path("models") / f"{Path(weights).stem}{tag}-{size}-int8.onnx"


def _measure(
    int8_path: Path, fp32_path: Path, labels_path: str | None, frames, latency_runs: int, show: bool
) -> tuple[dict, dict]:
    """Accuracy (if labels) and latency of the INT8 model and its fp32 reference, measured in one run."""
    int8_res: dict = {}
    fp32_res: dict = {}
    probe = frames[0]
    if labels_path:
        labels = load_labels(labels_path)
        for path, res in ((int8_path, int8_res), (fp32_path, fp32_res)):
            with tqdm(total=len(labels), desc=f"eval {path.stem}", disable=not show, leave=False) as bar:
                s = evaluate_accuracy(path, labels, progress=bar)
            res["persons_eval"] = {
                "labels": str(labels_path),
                "ap50": round(s.ap50, 4),
                "ap50_95": round(s.ap50_95, 4),
                f"precision@{s.conf}": round(s.precision, 4),
                f"recall@{s.conf}": round(s.recall, 4),
            }
        probe = cv2.imread(str(labels[0].path))
    if latency_runs > 0:
        threads = sorted({1, os.cpu_count() or 1})
        with tqdm(total=latency_runs, desc="latency", disable=not show, leave=False) as bar:
            lat = measure_latency(
                [int8_path, fp32_path],
                probe,
                threads,
                runs=latency_runs,
                progress=bar,
                stages=("infer", "detect"),
            )
        for stage, key in (("infer", "infer_ms"), ("detect", "latency_ms")):
            a, b = lat[str(int8_path)][stage], lat[str(fp32_path)][stage]
            int8_res[key] = {str(n): round(v, 2) for n, v in a.items()}
            fp32_res[key] = {str(n): round(v, 2) for n, v in b.items()}
            int8_res.setdefault("speedup_vs_fp32", {})[stage] = {
                str(n): round(b[n] / a[n], 3) for n in threads
            }
        int8_res["latency_note"] = (
            "median ms per intra-op thread count; infer_ms = network only, latency_ms = detect() "
            "(letterbox + network + decode) on a persons-eval image (or a calibration frame)"
        )
    return int8_res, fp32_res


def _check_output(path: Path, what: str) -> None:
    """Fail now, before any work, if ``path`` cannot be written: its folder is made and a file created there."""
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise ModelError(f"cannot write {what} {path}: {exc.strerror or exc}") from None


def _check_inputs(weights: str | os.PathLike, imgsz: tuple[int, int], calib: Sequence[str | os.PathLike],
                  calib_frames: int, labels: str | None) -> None:
    """Everything the build reads, checked before the slow steps (a bad --calib or --labels fails at once)."""
    problem = imgsz_problem(imgsz)
    if problem:
        raise ModelError(f"bad imgsz: {problem}")
    w = str(weights)
    if w.endswith(".onnx") and not Path(w).is_file():
        raise ModelError(f"model file not found: {w}")
    check_sources(calib, calib_frames)
    if labels:
        load_labels(labels)


def _staging_path(final: Path) -> Path:
    """A temporary file beside ``final`` (same folder, so the last step is an atomic rename)."""
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.", suffix=".tmp.onnx")
    os.close(fd)
    return Path(name)


def build_model(
    weights: str | os.PathLike,
    imgsz: tuple[int, int],
    calib: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    calib_frames: int = 128,
    settings: QuantSettings | None = None,
    keep_classes: Sequence[str] | None = None,
    fp32_out: str | os.PathLike | None = None,
    labels: str | None = None,
    latency_runs: int = 10,
    progress: bool = True,
    static_batch: bool = False,
) -> BuildResult:
    """Build an INT8 model (and optionally keep its fp32 twin); returns paths and the manifest written.

    Inputs and outputs are checked before the work; the model and its manifest are written to temporary files
    beside ``out`` and renamed over it only when every step succeeded, so a failed build leaves a good model
    (and its manifest) as it was. The model takes a batch of any size (several cameras' frames in one run,
    camera/fair_scheduler.py) unless ``static_batch``: at batch 1 both run as fast.
    """
    settings = settings or QuantSettings()
    out_path = Path(out) if out else default_out(weights, imgsz, keep_classes)
    _check_inputs(weights, imgsz, calib, calib_frames, labels)
    _check_output(out_path, "--out")
    fp32_final = Path(fp32_out) if fp32_out else None
    if fp32_final is not None:
        _check_output(fp32_final, "--fp32-out")
    staged: list[Path] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="smartcam-build-") as tmp,
            tqdm(total=4, desc="build", disable=not progress, unit="step") as steps,
        ):
            steps.set_postfix_str("fp32 export")
            fp32 = fixed_batch(fp32_model(weights, imgsz, Path(tmp) / "export"))
            if keep_classes:
                fp32 = slim_classes(fp32, keep_classes)
            names = model_names(fp32)
            if fp32_final is not None:
                fp32_path = _staging_path(fp32_final)
                staged.append(fp32_path)
            else:
                fp32_path = Path(tmp) / f"{out_path.stem}-fp32.onnx"
            onnx.save(fp32 if static_batch else dynamic_batch(fp32), fp32_path)
            steps.update(1)

            steps.set_postfix_str("calibration frames")
            sampled = sample_frames(calib, calib_frames, imgsz)
            frames = [image for _, image in sampled]
            steps.update(1)

            steps.set_postfix_str("calibrate + quantize")
            int8_path = _staging_path(out_path)
            staged.append(int8_path)
            with tqdm(
                total=len(frames), desc="calibrate", disable=not progress, leave=False, unit="frame"
            ) as bar:
                _, used = quantize_model(fp32, frames, imgsz, int8_path, settings, progress=bar)
            if not static_batch:  # after quantizing: its shape inference needs the fixed batch
                onnx.save(dynamic_batch(onnx.load(int8_path)), int8_path)
            steps.update(1)

            steps.set_postfix_str("measure")
            int8_res, fp32_res = _measure(int8_path, fp32_path, labels, frames, latency_runs, progress)
            steps.update(1)

            calibration = {
                "sources": [str(c) for c in calib],
                "frames": len(sampled),
                "frame_refs": [ref.as_dict() for ref, _ in sampled],
                "preprocess": "camera.detector.preprocess (letterbox 114, RGB, 0..1)",
            }
            quant = {**used.as_dict(), "excluded_node_names": used.excluded_nodes}
            manifest = build_manifest(
                model_path=int8_path,
                file_name=out_path.name,
                weights=str(weights),
                imgsz=imgsz,
                names=names,
                precision="int8",
                quantization=quant,
                calibration=calibration,
                results={**int8_res, "fp32_reference": fp32_res} if fp32_res else int8_res,
            )
            manifest["head"] = "slim: " + ",".join(keep_classes) if keep_classes else "all classes"
            manifest["batch"] = 1 if static_batch else BATCH_DIM
            fp32_manifest = None
            if fp32_final is not None:
                fp32_manifest = build_manifest(
                    model_path=fp32_path,
                    file_name=fp32_final.name,
                    weights=str(weights),
                    imgsz=imgsz,
                    names=names,
                    precision="fp32",
                    results=fp32_res,
                )
        # every step succeeded: now, and only now, the outputs replace what was there
        os.replace(int8_path, out_path)
        write_manifest(out_path, manifest)
        if fp32_final is not None:
            os.replace(fp32_path, fp32_final)
            write_manifest(fp32_final, fp32_manifest)
    finally:
        for path in staged:
            path.unlink(missing_ok=True)
    log.info("wrote %s (%s)", out_path, used.method)
    return BuildResult(out_path, manifest, fp32_final)
