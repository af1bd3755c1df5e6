"""WiSE-FT merging (models.weight_merge) on the real YOLOv8n training checkpoint."""

from __future__ import annotations

import pytest

from tests.conftest import MODELS

TRAINABLE = MODELS / "yolov8n-coco-trainable.pt"


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """A 'fine-tune' of the real checkpoint: every floating-point tensor moved by +1 (a known answer)."""
    torch = pytest.importorskip("torch")
    from ultralytics.nn.tasks import torch_safe_load

    ckpt, _ = torch_safe_load(str(TRAINABLE))
    model = ckpt.get("ema") or ckpt["model"]
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(1.0)
    out = tmp_path_factory.mktemp("wise") / "shifted.pt"
    torch.save(ckpt, out)
    return out


def _floats(path):
    from ultralytics.nn.tasks import torch_safe_load

    ckpt, _ = torch_safe_load(str(path))
    model = ckpt.get("ema") or ckpt["model"]
    return {k: v.float() for k, v in model.state_dict().items() if v.is_floating_point()}


def test_merged_weights_lie_alpha_of_the_way_to_the_fine_tune(shifted, tmp_path):
    from models.weight_merge import merge_checkpoints

    out = merge_checkpoints(TRAINABLE, shifted, 0.25, tmp_path / "merged.pt")
    base, merged = _floats(TRAINABLE), _floats(out)
    assert set(base) == set(merged) and len(base) > 250
    worst = max(float((merged[k] - base[k] - 0.25).abs().max()) for k in base)
    assert worst < 2e-3  # half precision in the checkpoint: 0.25 exactly up to rounding


def test_merged_checkpoint_loads_and_detects_like_any_checkpoint(shifted, tmp_path):
    import numpy as np
    from ultralytics import YOLO

    from models.weight_merge import merge_checkpoints

    out = merge_checkpoints(TRAINABLE, shifted, 0.0, tmp_path / "base-again.pt")  # alpha 0: the base itself
    image = np.full((320, 320, 3), 114, np.uint8)
    a = YOLO(str(out)).predict(image, imgsz=320, verbose=False)[0]
    b = YOLO(str(TRAINABLE)).predict(image, imgsz=320, verbose=False)[0]
    assert len(a.boxes) == len(b.boxes)
    from ultralytics.nn.tasks import torch_safe_load

    assert torch_safe_load(str(out))[0]["wise_ft"]["alpha"] == 0.0


def test_a_different_architecture_is_refused_with_the_tensor_named(tmp_path):
    torch = pytest.importorskip("torch")
    from models.weight_merge import interpolate_state

    with pytest.raises(ValueError, match="differ in 1 tensors"):
        interpolate_state({"a": torch.zeros(1)}, {"a": torch.zeros(1), "b": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="alpha must be between"):
        interpolate_state({}, {}, 1.5)


def test_merge_command_writes_the_merged_checkpoint_and_refuses_a_bad_alpha(shifted, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "half.pt"
    cmd = [sys.executable, "-m", "models", "merge", "--base", str(TRAINABLE), "--tuned", str(shifted), "--out"]
    done = subprocess.run([*cmd, str(out), "--alpha", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote {out}" in done.stdout
    merged, base = _floats(out), _floats(TRAINABLE)
    assert max(float((merged[k] - base[k] - 0.5).abs().max()) for k in base) < 2e-3
    bad = subprocess.run([*cmd, str(tmp_path / "bad.pt"), "--alpha", "2"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "alpha must be between 0 (the base) and 1 (the fine-tune), got 2.0" in bad.stderr
    assert not (tmp_path / "bad.pt").exists()
