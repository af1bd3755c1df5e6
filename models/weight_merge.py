"""Weight-space ensembling of a fine-tune with its base model (WiSE-FT: Wortsman et al., CVPR 2022).

Why: a fine-tune that trains the neck learns one camera's small people but forgets part of what the general
model knew (the street clip: +7.8 points AP50 on the camera, -6.0 on persons-eval). Both models start from the
same weights, so the straight line between them stays in one low-loss basin: the model halfway,
``theta = (1 - alpha) * base + alpha * tuned``, keeps much of the gain and much of the general knowledge, at no
extra cost at run time (one model, the same architecture). ``alpha`` 0 is the base, 1 the fine-tune; BatchNorm
running statistics are interpolated the same way, integer buffers (batch counters) come from the fine-tune.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def check_alpha(alpha: float) -> float:
    """``alpha`` if it is a weight between 0 and 1 (checked before a long fine-tune, not after it)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 (the base) and 1 (the fine-tune), got {alpha}")
    return alpha


def interpolate_state(base: Mapping[str, Any], tuned: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """``(1 - alpha) * base + alpha * tuned`` for every floating-point tensor (in float32, then the tuned
    tensor's dtype); other tensors are the tuned model's. Both must hold the same names and shapes.

    >>> import torch
    >>> out = interpolate_state({"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)},
    ...                         {"w": torch.tensor([2.0, 4.0]), "n": torch.tensor(5)}, 0.25)
    >>> out["w"].tolist(), int(out["n"])
    ([0.5, 2.5], 5)
    >>> interpolate_state({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, 0.5)
    Traceback (most recent call last):
    ValueError: tensor w has shape (2,) in the base and (3,) in the fine-tune: not the same architecture
    """
    check_alpha(alpha)
    missing = sorted(set(base) ^ set(tuned))
    if missing:
        raise ValueError(f"the base and the fine-tune differ in {len(missing)} tensors (e.g. {missing[0]}): "
                         "not the same architecture")
    out: dict[str, Any] = {}
    for name, t in tuned.items():
        b = base[name]
        if tuple(b.shape) != tuple(t.shape):
            raise ValueError(f"tensor {name} has shape {tuple(b.shape)} in the base and {tuple(t.shape)} in the "
                             "fine-tune: not the same architecture")
        if t.is_floating_point():
            out[name] = ((1.0 - alpha) * b.float() + alpha * t.float()).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def _model_of(ckpt: dict, path: Path):
    """The network of an Ultralytics checkpoint: its EMA weights when it has them (what training keeps)."""
    model = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if model is None or not hasattr(model, "state_dict"):
        raise ValueError(f"{path}: not an Ultralytics checkpoint (no 'model' or 'ema' network)")
    return model


def merge_checkpoints(base: str | os.PathLike, tuned: str | os.PathLike, alpha: float,
                      out: str | os.PathLike) -> Path:
    """Write ``out``: the fine-tuned checkpoint ``tuned`` with its weights moved towards ``base`` (a checkpoint
    of the same architecture, the one it was fine-tuned from). The result loads, builds and trains like any
    Ultralytics checkpoint; ``ckpt['wise_ft']`` records what was merged."""
    import torch
    from ultralytics.nn.tasks import torch_safe_load

    base, tuned, out = Path(base), Path(tuned), Path(out)
    for p in (base, tuned):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint not found: {p}")
    base_ckpt, _ = torch_safe_load(str(base))
    tuned_ckpt, _ = torch_safe_load(str(tuned))
    model = _model_of(tuned_ckpt, tuned)
    merged = interpolate_state(_model_of(base_ckpt, base).state_dict(), model.state_dict(), alpha)
    model.load_state_dict(merged)
    tuned_ckpt.update({"model": model, "ema": None, "optimizer": None, "updates": None,
                       "wise_ft": {"base": str(base), "tuned": str(tuned), "alpha": alpha}})
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tuned_ckpt, out)
    log.info("wrote %s: %.2f x %s + %.2f x %s", out, 1 - alpha, base.name, alpha, tuned.name)
    return out
