"""One detector for many cameras: a pool of inference workers shared fairly by per-camera lanes.

Why: N cameras in N processes load N copies of the model and N sets of onnxruntime threads that fight over the
same cores with no notion of fairness (Frigate runs one detector queue for every camera for the same reason).
Here every camera owns a :class:`Lane` with the interface of :class:`~camera.inference.InferenceQueue` (frames in,
results back in that camera's frame order), and one :class:`FairScheduler` runs the lanes' frames on ``workers``
threads. When frames from several lanes wait, the next one comes from the lane with the least *virtual time*
(stride scheduling): each run advances its lane's clock by ``1 / weight``, so a lane of weight 10 gets twice the
runs of a lane of weight 5 while both are saturated, and a lane that was idle re-enters at the current clock
instead of cashing in credit. A lane holds at most ``depth`` frames; beyond that :meth:`Lane.put` waits for its
oldest, which is what makes a live source drop its stale frames (it keeps only the newest) instead of falling
behind real time, and a file wait for its turn. Frames a camera's motion gate skips never enter the pool, so
quiet cameras free capacity for busy ones.

Batching (``max_batch`` > 1): a worker that picks a frame whose lane has a ``batch`` detector (a model with a
dynamic batch, camera/detector.py) keeps picking, in the same fair order, while the next frame is for the same
model session, up to ``max_batch`` frames, and runs them as one network call (:func:`camera.detector.detect_batch`).
The order in which frames are picked, and so every lane's share, is the same as without batching; each frame's
result is what its own camera's detector would have given alone. A worker takes no more than its share of the
waiting frames among the idle workers (:func:`batch_limit`), so a batch never leaves another worker idle.

>>> sched = FairScheduler(workers=1)
>>> a, b = sched.lane(lambda img: ("a", img), "a"), sched.lane(lambda img: ("b", img), "b")
>>> from camera.frame import Frame
>>> out = [done.index for i in range(3) for done, _ in a.put(Frame(image=i, ts=i, index=i))]
>>> out += [done.index for done, _ in a.drain()]
>>> out, a.runs, b.runs
([0, 1, 2], 3, 0)
>>> sched.close()
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from camera.detector import detect_batch
from camera.frame import Frame
from camera.inference import Result

log = logging.getLogger(__name__)


def batch_limit(waiting: int, idle: int, max_batch: int) -> int:
    """Frames one worker may take for a batch: its share of what waits among the idle workers (itself included),
    at most ``max_batch``. Taking everything would leave the other workers idle with a frame or two per camera
    in the pool (one camera, batch 4, two workers: measured at half the throughput).

    >>> batch_limit(4, 2, 4), batch_limit(2, 1, 4), batch_limit(12, 2, 4), batch_limit(1, 2, 4)
    (2, 2, 4, 1)
    """
    return max(1, min(max_batch, -(-waiting // max(1, idle))))


class _Job:
    """One frame waiting for, or in, the detector; ``result`` is set by a worker."""

    __slots__ = ("detect", "done", "error", "image", "result")

    def __init__(self, image: Any, detect: Callable[[Any], Any]) -> None:
        self.image, self.detect = image, detect
        self.result: Result = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def wait(self) -> Result:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class FairScheduler:
    """``workers`` inference threads serving every lane by weighted fair share (see the module docstring)."""

    def __init__(self, workers: int = 1, max_batch: int = 1) -> None:
        self.workers = max(1, int(workers))
        self.max_batch = max(1, int(max_batch))
        self.batches: dict[int, int] = {}  # network runs by batch size (stats, the benchmark)
        self._busy = 0  # workers running frames now (guarded by the lock)
        self._cond = threading.Condition()
        self._lanes: list[Lane] = []
        self._clock = 0.0  # virtual time: the least pass of the lanes served so far
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"detector-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    def lane(self, detect: Callable[[Any], Any], name: str, *, weight: float = 1.0, depth: int | None = None,
             batch: Any = None) -> Lane:
        """A new lane for one camera: ``detect(image) -> Detections``, its share ``weight`` (e.g. its fps),
        ``depth`` frames in the pool at most (default ``workers + 1``: every worker can stay busy on it alone).
        ``batch``: the :class:`~camera.detector.Detector` whose ``detect`` that is, when the lane's frames may run
        in one batch with other lanes' frames on the same session (only if its model's batch is dynamic)."""
        lane = Lane(self, detect, name, weight=weight, depth=depth or self.workers + 1,
                    batch=batch if batch is not None and getattr(batch, "dynamic_batch", False) else None)
        with self._cond:
            self._lanes.append(lane)
        return lane

    # ------------------------------------------------------------------ called by lanes
    def _submit(self, lane: Lane, job: _Job) -> None:
        with self._cond:
            if not lane.waiting:  # re-entering after idling: no credit for the time it asked for nothing
                lane.pass_ = max(lane.pass_, self._clock)
            lane.waiting.append(job)
            self._cond.notify()

    def _remove(self, lane: Lane) -> None:
        with self._cond:
            for job in lane.waiting:
                job.error = RuntimeError(f"lane {lane.name} closed")
                job.done.set()
            lane.waiting.clear()
            if lane in self._lanes:
                self._lanes.remove(lane)

    # ------------------------------------------------------------------ workers
    def _pick(self) -> tuple[Lane, _Job] | None:
        """The next frame in fair order (the lane with the least virtual time), or None if none waits."""
        ready = [lane for lane in self._lanes if lane.waiting]
        if not ready:
            return None
        lane = min(ready, key=lambda ln: (ln.pass_, ln.order))
        return lane, lane.waiting[0]

    def _take(self, lane: Lane) -> _Job:
        self._clock = lane.pass_
        lane.pass_ += 1.0 / lane.weight
        lane.runs += 1
        return lane.waiting.popleft()

    def _next(self) -> list[tuple[Lane, _Job]] | None:
        """The frames for one network run: the next in fair order, plus (batching) the ones after it in the same
        order while they are for the same session; None when closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                picked = self._pick()
                if picked is not None:
                    lane = picked[0]
                    session = lane.batch.session if lane.batch is not None and self.max_batch > 1 else None
                    limit = 1 if session is None else batch_limit(
                        sum(len(ln.waiting) for ln in self._lanes), self.workers - self._busy, self.max_batch)
                    jobs = [(lane, self._take(lane))]
                    while len(jobs) < limit:
                        following = self._pick()
                        if following is None or following[0].batch is None or \
                                following[0].batch.session is not session:
                            break
                        jobs.append((following[0], self._take(following[0])))
                    self._busy += 1
                    return jobs
                self._cond.wait()

    def _work(self) -> None:
        while (picked := self._next()) is not None:
            t0 = time.perf_counter()
            results: list[Any] = []
            if len(picked) > 1:
                try:
                    results = detect_batch([lane.batch for lane, _ in picked], [job.image for _, job in picked])
                except Exception:  # noqa: BLE001 - e.g. one camera's bad frame: each one alone, its error its own
                    log.debug("a batch of %d failed; running its frames one by one", len(picked), exc_info=True)
                    results = []
            if not results:
                for _, job in picked:
                    try:
                        results.append(job.detect(job.image))
                    except BaseException as exc:  # noqa: BLE001 - handed to the camera's own thread, raised there
                        results.append(exc)
            share_ms = (time.perf_counter() - t0) * 1000.0 / len(picked)  # each frame's share of the run
            self.batches[len(picked)] = self.batches.get(len(picked), 0) + 1
            for (lane, job), outcome in zip(picked, results, strict=True):
                if isinstance(outcome, BaseException):
                    job.error = outcome
                else:
                    job.result = (outcome, share_ms)
                lane.busy_ms += share_ms
                job.image = None
                job.done.set()
            with self._cond:
                self._busy -= 1

    def close(self) -> None:
        """Stop the workers (frames still waiting are failed; call after every lane is drained)."""
        with self._cond:
            self._closed = True
            for lane in self._lanes:
                for job in lane.waiting:
                    job.error = RuntimeError("detector pool closed")
                    job.done.set()
                lane.waiting.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=30)


class Lane:
    """One camera's way into the shared pool; the same calls as :class:`~camera.inference.InferenceQueue`."""

    _count = 0

    def __init__(self, scheduler: FairScheduler, detect: Callable[[Any], Any], name: str, *, weight: float,
                 depth: int, batch: Any = None) -> None:
        if weight <= 0:
            raise ValueError(f"lane weight must be > 0, got {weight}")
        self.scheduler, self._detect, self.name = scheduler, detect, name
        self.weight, self.depth = float(weight), max(1, int(depth))
        self.batch = batch  # the Detector its frames may be batched on (None: one by one through ``detect``)
        Lane._count += 1
        self.order = Lane._count  # ties in virtual time go to the older lane: deterministic
        self.pass_ = 0.0
        self.waiting: deque[_Job] = deque()  # guarded by the scheduler's lock
        self.runs = 0  # frames this lane had run through the detector
        self.busy_ms = 0.0  # detector time spent on this lane's frames
        self._pending: deque[tuple[Frame, _Job | None]] = deque()

    def put(self, frame: Frame, detect: bool = True) -> Iterator[tuple[Frame, Result]]:
        """Queue ``frame`` (``detect=False``: skip the detector); yield this lane's frames now done, in order.
        Waits for the oldest only while ``depth`` frames are in the pool."""
        job = None
        if detect:
            job = _Job(frame.image, self._detect)
            self.scheduler._submit(self, job)
        self._pending.append((frame, job))
        while self._pending and (self._in_pool() > self.depth or len(self._pending) > 4 * self.depth
                                 or self._head_done()):
            yield self._pop()

    def _in_pool(self) -> int:
        return sum(1 for _, job in self._pending if job is not None)

    def _head_done(self) -> bool:
        job = self._pending[0][1]
        return job is None or job.done.is_set()

    def drain(self) -> Iterator[tuple[Frame, Result]]:
        """Every frame still queued, in order, waiting for the detector."""
        while self._pending:
            yield self._pop()

    def _pop(self) -> tuple[Frame, Result]:
        frame, job = self._pending.popleft()
        return frame, (job.wait() if job is not None else None)

    def close(self) -> None:
        """Leave the pool; frames still queued are dropped."""
        self._pending.clear()
        self.scheduler._remove(self)
