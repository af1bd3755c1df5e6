"""Dead-letter flood: how much memory and disk a running sink spends on batches of junk (issue 12 §2.2).

A hostile (or broken) camera publishes ``--messages`` batch messages on ``smartcam/lobby/cam-1/batch``, each
``--lines`` lines of schema-invalid JSON compressed with the batch codec (~19 kB for 10,000 lines). A real sink
(``python -m cloud_sink run``, SQLite) ingests them from a real Mosquitto; the bench samples the sink's resident
memory (/proc/PID/status VmRSS, and VmHWM = its peak) while it drains the flood and reports the dead-letter rows,
the database size and the drain time. ``--code DIR`` runs the sink from another checkout (e.g. the commit before
the fix, exported with ``git archive``), so the two can be compared on one machine.

    python bench/dead_letter_flood.py --messages 60 --lines 10000
    python bench/dead_letter_flood.py --messages 60 --lines 10000 --code /tmp/old   # git archive 81191d2 | tar -x
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contract.batch import encode_batch  # noqa: E402
from contract.broker import BrokerSettings, make_client  # noqa: E402
from tests.services import start_mosquitto  # noqa: E402


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _count(db: Path, sql: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute(sql).fetchone()[0] or 0)
    except sqlite3.Error:
        return -1


def run(messages: int, lines: int, code: Path, workdir: Path) -> dict:
    broker = start_mosquitto(workdir / "mosquitto")
    db = workdir / "sink.db"
    log = workdir / "sink.log"
    env = dict(os.environ, PYTHONPATH=str(code), PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        sink = subprocess.Popen([sys.executable, "-m", "cloud_sink", "run", "--broker", broker.url, "--db",
                                 f"sqlite:///{db}", "--client-id", "flood-sink", "--log-every", "1"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=code)
    try:
        deadline = time.monotonic() + 60
        while "connected to" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # SUBACK (the old sink logs nothing for it)
        baseline_kb = _status_kb(sink.pid, "VmRSS")
        payloads = [encode_batch([json.dumps({"junk": i, "message": m}) for i in range(lines)])
                    for m in range(messages)]
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set() and sink.poll() is None:
                samples.append(_status_kb(sink.pid, "VmRSS"))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        settings = BrokerSettings.from_url(broker.url)
        client = make_client(settings, "flood-publisher")
        client.connect(settings.host, settings.port)
        client.loop_start()
        started = time.monotonic()
        infos = [client.publish("smartcam/lobby/cam-1/batch", p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(120)
        client.disconnect()
        client.loop_stop()
        # drained when the sink has stopped working: its CPU time and the dead-letter count unchanged for 3 s
        last, stable_since = (-2, -1), time.monotonic()
        while time.monotonic() - started < 1800:
            now = (_count(db, "SELECT COUNT(*) FROM dead_letters"), _cpu_ticks(sink.pid))
            if now != last:
                last, stable_since = now, time.monotonic()
            elif now[0] > 0 and time.monotonic() - stable_since > 3:
                break
            time.sleep(0.25)
        drained_s = stable_since - started
        last = last[0]
        stop.set()
        sampler.join(2)
        result = {
            "messages": messages, "lines_per_message": lines,
            "compressed_bytes_per_message": round(sum(map(len, payloads)) / len(payloads)),
            "code": str(code), "baseline_rss_mb": round(baseline_kb / 1024, 1),
            "peak_rss_mb": round(max([baseline_kb, *samples]) / 1024, 1),
            "peak_rss_hwm_mb": round(_status_kb(sink.pid, "VmHWM") / 1024, 1),
            "final_rss_mb": round(_status_kb(sink.pid, "VmRSS") / 1024, 1),
            "dead_letter_rows": last,
            "db_mb": round(sum(p.stat().st_size for p in workdir.glob("sink.db*")) / 2**20, 1),
            "drain_s": round(drained_s, 1),
        }
    finally:
        sink.terminate()
        try:
            sink.wait(30)
        except subprocess.TimeoutExpired:
            sink.kill()
        broker.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=60, help="junk batch messages to publish (default 60)")
    parser.add_argument("--lines", type=int, default=10_000, help="junk lines per message (default 10000)")
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout to run the sink from (default this one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dl-flood-") as tmp:
        print(json.dumps(run(args.messages, args.lines, args.code.resolve(), Path(tmp)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
