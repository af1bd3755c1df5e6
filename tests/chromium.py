"""Real headless Chromium (Debian's) driven by Playwright, and a real uvicorn server for an app: what the
dashboard tests see the dashboard with. The ``browser`` fixture is in tests/conftest.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.services import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def serve(app) -> Iterator[str]:
    """The app on a real uvicorn server (127.0.0.1, free port) in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(10)


class PageWatch:
    """Console errors, page exceptions and every URL the page requested."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("request", lambda req: self.requests.append(req.url))


def open_dashboard(browser, url: str):
    """A desktop-sized page on the dashboard, watched, once its first refresh is done; (page, watch)."""
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    watch = PageWatch(page)
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]", timeout=20000)
    return page, watch
