"""Report: durations, table layout and the rendered text over the hand-computed rollup scenario."""

from __future__ import annotations

import json

import pytest

from cloud_sink import report
from cloud_sink.config import ConfigError, load_config
from tests.rollup_scenario import H0, H1


@pytest.mark.parametrize(("text", "ago"), [("24h", 86400), ("30m", 1800), ("7d", 7 * 86400), ("90s", 90),
                                           ("2w", 14 * 86400), ("1.5h", 5400)])
def test_parse_since_durations(text, ago):
    assert report.parse_since(text, now=1_000_000.0) == 1_000_000.0 - ago


def test_parse_since_timestamps_and_errors():
    assert report.parse_since("2026-05-28T20:00:00.000Z") == H0
    assert report.parse_since("2026-05-28T20:00:00+00:00") == H0
    with pytest.raises(ValueError, match="expected a duration"):
        report.parse_since("last tuesday")


def test_table_aligns_numbers_right_and_text_left():
    lines = report.table(["name", "n", "mean"], [["a", 5, 1.234], ["long-name", 123, None]]).splitlines()
    assert lines[0] == "name         n  mean"
    assert lines[2] == "a            5  1.23"
    assert lines[3] == "long-name  123     -"


def test_render_shows_every_section(loaded):
    data = report.build(loaded, since=H0, until=H1 + 3600)
    text = report.render(data)
    assert "events stored: 24" in text and "dead letters: 0" in text
    header, rule, cam1, cam2 = text.splitlines()[2:6]
    assert header.split()[:3] == ["camera", "state", "last"] and set(rule) <= {"-", " "}
    assert cam1.startswith("lobby/cam-1") and "2026-05-28T20h (3)" in cam1
    assert cam2.startswith("lobby/cam-2")
    assert "per hour (UTC):" in text and "2026-05-28T21h" in text
    assert "zones:" in text and "door" in text and "lines:" in text and "gate" in text
    assert json.loads(report.to_json(data))["cameras"][0]["hourly"][0]["entries"] == 3


def test_render_empty_database(store):  # noqa: F811
    assert "no cameras" in report.render(report.build(store, since=0))


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "sink.yaml"
    path.write_text("db: sqlite:///a.db\nbatch_size: 100\nhttp: 127.0.0.1:9000\n")
    cfg = load_config(path, {"batch_size": 50, "broker": None})
    assert (cfg.db, cfg.batch_size, cfg.broker, cfg.http_address()) == (
        "sqlite:///a.db", 50, "mqtt://127.0.0.1:1883", ("127.0.0.1", 9000))
    path.write_text("bacth_size: 1\n")
    with pytest.raises(ConfigError, match="bacth_size"):
        load_config(path, {})
    with pytest.raises(ConfigError, match="share_group"):
        load_config(None, {"share_group": "a/b"})
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_config(None, {"http": "8080"}).http_address()


def test_sample_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "samples" / "sink.yaml", {})
    assert cfg.client_id == "smartcam-sink" and cfg.limits().max_bytes == 65536
