"""Per-model score thresholds for a new model, chosen by *precision matching* on the camera's validation slice.

The edge's score thresholds (the detector's ``conf``, the EventBuilder's ``track_threshold``, the tracker's
``high_score`` and ``new_track_score``) were tuned on the general model's scores. A fine-tuned model scores the
same people differently (on the street clip the fine-tuned heads' precision at conf 0.25 fell from 0.95 to
0.46-0.50 while recall rose 0.43 -> 0.82), so the old numbers mean something else for it. The rule here: for
each threshold ``t`` of the current model, take the current model's precision ``p(t)`` on the slice (its
detections scoring above ``t``, matched at IoU 0.5), and give the new model the **lowest** threshold at which
*its* precision is still at least ``p(t)``: the tracker and the events then see detections as reliable as the
ones they were tuned for, with whatever recall the new model gains on top. Matching recall instead would throw
the new model's gain away; a fixed precision target would not respect the current model's (measured) operating
points; maximising F1 would change the operating point the rest of the edge was tuned at.

Guards: a threshold is kept as it is (the reason said) when the current model has fewer than ``min_boxes``
detections above it on the slice, when the new model never gets that precious with ``min_boxes`` detections,
and every chosen value is clamped to ``[lo, hi]``; the tracker's order (``conf <= high_score <=
new_track_score``) is restored if the matching broke it. The slice is the teacher-labeled latest time slice
the loop already evaluates on (never ground truth, never persons-eval), so this is a calibration against the
teacher, the same labels the gate's camera AP50 uses.

>>> flags = np.array([TP, TP, TP, FP, TP, FP, FP, FP])          # the current model: 0.9 .. 0.2
>>> cur = ScoredBoxes(np.array([.9, .8, .7, .6, .5, .4, .3, .2]), flags)
>>> new = ScoredBoxes(np.array([.95, .9, .85, .8, .75, .7, .65, .6]), flags)   # the same boxes, scored higher
>>> round(cur.precision_above(0.45)[0], 2)                        # 4 of the 5 boxes above 0.45 are right
0.8
>>> c = choose_thresholds(cur, new, {"conf": 0.45}, keys=("conf",), min_boxes=3)
>>> c.thresholds["conf"]                                          # the same 5 boxes, on the new model's scale
0.725
>>> c = choose_thresholds(cur, new, {"conf": 0.45}, keys=("conf",), min_boxes=6)
>>> c.thresholds["conf"], c.rows[0]["reason"]
(0.45, 'kept: the current model has 5 < 6 boxes above 0.45 on the slice')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from models.evaluate import FP, NEUTRAL, TP, LabeledImage, Prediction, match_image

# the edge's score thresholds a model's manifest may carry, and what a camera runs a registry model at when its
# manifest does not say: the registry's default conf 0.25 and track_threshold 0.5 (models/registry.py
# DEFAULT_THRESHOLDS), the tracker's high_score 0.4 / new_track_score 0.5 (camera/tracker.py). A camera running
# its configured model (no over-the-air one) detects at camera/config.py's detector.conf 0.1 instead: say so with
# ``smartcam-model loop --current-threshold conf=0.1``.
DEFAULTS: dict[str, float] = {"conf": 0.25, "track_threshold": 0.5, "high_score": 0.4, "new_track_score": 0.5}
MATCHED: tuple[str, ...] = tuple(DEFAULTS)
MIN_BOXES = 20  # detections the slice must hold above a threshold for its precision to mean anything
RANGE = (0.1, 0.9)  # chosen thresholds stay inside (0.1: the tracker's low_score)

__all__ = ["DEFAULTS", "FP", "MATCHED", "NEUTRAL", "TP", "ScoredBoxes", "ThresholdChoice", "choose_thresholds"]


@dataclass(frozen=True)
class ScoredBoxes:
    """Every detection of one model on the slice: its score and whether it is right (TP / FP / NEUTRAL at IoU 0.5,
    :func:`models.evaluate.match_image`). Neutral ones (ignore regions, barely visible people) count neither way."""

    scores: np.ndarray
    flags: np.ndarray

    @classmethod
    def of(cls, labels: Sequence[LabeledImage], preds: Sequence[Prediction], iou: float = 0.5) -> ScoredBoxes:
        if len(labels) != len(preds):
            raise ValueError(f"{len(preds)} predictions for {len(labels)} labeled images")
        flags = [match_image(p, g, iou)[0] for p, g in zip(preds, labels, strict=True)]
        scores = [np.asarray(p.scores, np.float64) for p in preds]
        return cls(np.concatenate(scores) if scores else np.zeros(0), np.concatenate(flags) if flags else
                   np.zeros(0, np.int8))

    def _counted(self) -> tuple[np.ndarray, np.ndarray]:
        """Scores (descending) and right/wrong of the detections that count."""
        keep = self.flags != NEUTRAL
        s, f = np.asarray(self.scores, np.float64)[keep], np.asarray(self.flags)[keep] == TP
        order = np.argsort(-s, kind="stable")
        return s[order], f[order]

    def precision_above(self, t: float) -> tuple[float, int]:
        """Precision of the detections scoring above ``t`` (the edge keeps ``score > conf``), and how many."""
        s, right = self._counted()
        above = s > t
        n = int(above.sum())
        return (float(right[above].sum()) / n if n else 0.0), n

    def lowest_threshold(self, precision: float, min_boxes: int) -> float | None:
        """The lowest threshold whose detections above it (at least ``min_boxes``) have at least ``precision``;
        None if there is none. Set halfway between two scores, so ``>`` and ``>=`` keep the same boxes."""
        s, right = self._counted()
        n = np.arange(1, len(s) + 1)
        prec = np.cumsum(right) / n
        cut = np.r_[s[1:] < s[:-1], True]  # a threshold can only fall between two different scores
        ok = np.flatnonzero(cut & (n >= min_boxes) & (prec >= precision - 1e-9))
        if not ok.size:
            return None
        k = int(ok[-1])
        t = float(s[k] + s[k + 1]) / 2 if k + 1 < len(s) else float(s[k]) * 0.999
        for digits in (3, 4, 5, 6):  # the shortest number that keeps the same boxes above it
            if int((s > round(t, digits)).sum()) == k + 1:
                return round(t, digits)
        return t


@dataclass
class ThresholdChoice:
    """The chosen thresholds and, per threshold, how (``rows``: current value and precision, chosen value and the
    new model's precision there, or why the current value was kept)."""

    thresholds: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = ["| threshold | current | precision (current) | chosen | precision (new) | boxes above (new) |",
                 "|---|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            lines.append(f"| {r['name']} | {r['current']:.3f} | {r['precision_current']:.3f} | {r['chosen']:.3f} | "
                         f"{r['precision_new']:.3f} | {r['boxes_new']} |")
        return "\n".join(lines)


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def choose_thresholds(current: ScoredBoxes, candidate: ScoredBoxes, current_thresholds: Mapping[str, float],
                      keys: Sequence[str] = MATCHED, lo: float = RANGE[0], hi: float = RANGE[1],
                      min_boxes: int = MIN_BOXES) -> ThresholdChoice:
    """Precision matching (the module docstring): ``current_thresholds`` are the current model's (missing ones:
    the edge's :data:`DEFAULTS`); returns the candidate's ``keys`` thresholds."""
    chosen: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for key in keys:
        t = float(current_thresholds.get(key, DEFAULTS[key]))
        p_cur, n_cur = current.precision_above(t)
        value, reason = t, ""
        if n_cur < min_boxes:
            reason = f"kept: the current model has {n_cur} < {min_boxes} boxes above {t:g} on the slice"
        else:
            found = candidate.lowest_threshold(p_cur, min_boxes)
            if found is None:
                reason = f"kept: the new model never reaches precision {p_cur:.3f} with {min_boxes}+ boxes"
            else:
                value = _clamp(found, lo, hi)
                reason = "matched" if value == found else f"matched {found:.3f}, clamped to [{lo}, {hi}]"
        chosen[key] = value
        rows.append({"name": key, "current": t, "precision_current": p_cur, "boxes_current": n_cur,
                     "chosen": value, "reason": reason})
    if {"conf", "high_score"} <= chosen.keys() and chosen["high_score"] < chosen["conf"]:
        chosen["high_score"] = chosen["conf"]
    if {"high_score", "new_track_score"} <= chosen.keys() and chosen["new_track_score"] < chosen["high_score"]:
        chosen["new_track_score"] = chosen["high_score"]
    for r in rows:
        if chosen[r["name"]] != r["chosen"]:
            r["chosen"], r["reason"] = chosen[r["name"]], r["reason"] + "; raised to keep the tracker's order"
        r["precision_new"], r["boxes_new"] = candidate.precision_above(r["chosen"])
    return ThresholdChoice(chosen, rows)
