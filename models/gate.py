"""The gate of the learning loop: a fine-tuned model ships only if it is better *for that camera* and no worse,
beyond a set amount, *in general*.

(a) AP50 on a held-out time slice of the camera's own labeled frames must rise by at least ``min_gain``;
(b) AP50 on persons-eval (people the camera never saw) may fall by at most ``max_drop``.
Both in AP50 points (0.01 = 1 point). The reason is said either way.

>>> g = GateSpec(min_gain=0.01, max_drop=0.01)
>>> decide(AP(0.80, 0.48), AP(0.85, 0.475), g).passed
True
>>> print(decide(AP(0.80, 0.48), AP(0.85, 0.45), g).reason)
refused: persons-eval AP50 0.4800 -> 0.4500 (-3.0 pt) drops more than the allowed 1.0 pt
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GateSpec:
    min_gain: float = 0.01  # camera AP50 must rise at least this much (AP50 points / 100)
    max_drop: float = 0.01  # persons-eval AP50 may fall at most this much


@dataclass(frozen=True)
class AP:
    """AP50 of one model on (a) the camera's held-out slice and (b) persons-eval."""

    camera: float
    general: float


@dataclass(frozen=True)
class Decision:
    passed: bool
    reason: str
    before: AP
    after: AP
    spec: GateSpec

    def as_dict(self) -> dict:
        return asdict(self)


def _pt(x: float) -> str:
    return f"{x * 100:+.1f} pt"


def decide(before: AP, after: AP, spec: GateSpec) -> Decision:
    """Accept or refuse ``after`` against ``before`` (see the module docstring)."""
    gain = after.camera - before.camera
    drop = before.general - after.general
    cam = f"camera AP50 {before.camera:.4f} -> {after.camera:.4f} ({_pt(gain)})"
    gen = f"persons-eval AP50 {before.general:.4f} -> {after.general:.4f} ({_pt(-drop)})"
    if gain < spec.min_gain - 1e-12:
        return Decision(False, f"refused: {cam} is below the required {_pt(spec.min_gain)}", before, after, spec)
    if drop > spec.max_drop + 1e-12:
        return Decision(False, f"refused: {gen} drops more than the allowed {spec.max_drop * 100:.1f} pt",
                        before, after, spec)
    return Decision(True, f"accepted: {cam}, at least {_pt(spec.min_gain)}; {gen}, within "
                          f"{spec.max_drop * 100:.1f} pt", before, after, spec)
