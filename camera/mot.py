"""MOTChallenge tracks file: every person track's box per processed frame, so standard tools can score it.

One line per box: ``frame, id, x, y, w, h, score, -1, -1, -1`` (frame 1-based in the source, box left/top/width/
height in source pixels, the MOTChallenge 2D layout that TrackEval and py-motmetrics read). Only tracks matched in
that frame are written (a coasting track's predicted box is a guess, not an observation).

>>> import io, numpy as np
>>> from camera.tracker import Track
>>> t = Track(track_id=3, xyxy=np.array([10, 20, 40, 100], np.float32), score=0.8, class_id=0, first_seen=0.0,
...           last_seen=0.0)
>>> out = io.StringIO()
>>> MotWriter(out).write(7, [t])
>>> out.getvalue()
'7,3,10.00,20.00,30.00,80.00,0.8000,-1,-1,-1\\n'
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import IO

from camera.tracker import Track


class MotWriter:
    """Writes tracks in the MOTChallenge text format to a path (created, truncated) or an open text stream."""

    def __init__(self, target: str | Path | IO[str]) -> None:
        if isinstance(target, (str, Path)):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._fh: IO[str] = open(target, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._owned = True
        else:
            self._fh, self._owned = target, False
        self.rows = 0

    def write(self, frame_number: int, tracks: Iterable[Track]) -> None:
        """The boxes of ``tracks`` seen in frame ``frame_number`` (1-based); coasting tracks are skipped."""
        lines = []
        for t in tracks:
            if not t.visible:
                continue
            x1, y1, x2, y2 = (float(v) for v in t.xyxy)
            lines.append(f"{frame_number},{t.track_id},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},"
                         f"{t.score:.4f},-1,-1,-1\n")
        if lines:
            self._fh.write("".join(lines))
            self.rows += len(lines)

    def close(self) -> None:
        if self._owned:
            self._fh.close()
        else:
            self._fh.flush()
