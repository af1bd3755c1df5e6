"""Recent samples per camera on the dashboard, behind the API token (issue 15): real uvicorn, real Chromium."""

from __future__ import annotations

import time

import pytest

from cloud_sink.ingest import Ingestor
from cloud_sink.samples import SampleSink, SampleStorage
from cloud_sink.store import Store
from contract.sample import decode_sample
from tests.chromium import CHROMIUM, open_dashboard, serve
from tests.sample_payloads import TOPIC, a_sample

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium: run scripts/setup.sh")]
TOKEN = "samples-token-42"


def test_dashboard_shows_a_cameras_recent_samples_with_the_token(browser, tmp_path):  # noqa: F811
    import httpx

    from cloud_sink.api import create_app

    store = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
    storage = SampleStorage(str(tmp_path / "store"))
    ingestor = Ingestor(store, samples=SampleSink(store, storage))
    payloads = [a_sample(ts=1_767_323_000.0 + i) for i in range(3)]
    ingestor.handle([(TOPIC.replace("/sample", "/status"), b"online")] + [(TOPIC, p) for p in payloads])
    try:
        with serve(create_app(store, token=TOKEN, samples=storage)) as url:
            sample_id = decode_sample(payloads[0])[0]["sample_id"]
            assert httpx.get(f"{url}api/samples/{sample_id}.jpg").status_code == 401  # behind the token
            ok = httpx.get(f"{url}api/samples/{sample_id}.jpg", headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200 and ok.content == decode_sample(payloads[0])[1]
            page, watch = open_dashboard(browser, url + f"#token={TOKEN}")
            deadline = time.monotonic() + 20
            widths: list[int] = []
            while time.monotonic() < deadline and widths != [320, 320, 320]:
                page.wait_for_timeout(100)
                widths = page.eval_on_selector_all("#samples img", "imgs => imgs.map(i => i.naturalWidth)")
            assert widths == [320, 320, 320]  # decoded images, not broken links
            captions = page.eval_on_selector_all("#samples figcaption", "els => els.map(e => e.textContent)")
            assert captions[0].startswith("2026-01-02 03:03:22") and "near_threshold" in captions[0]
            assert not page.locator("#samples-card").is_hidden()
            assert not watch.errors, watch.errors
            page.close()
    finally:
        store.close()
