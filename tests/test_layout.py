"""The test suite's own layout: shared helpers live in tests/conftest.py and the helper modules (services,
sink_clients, sink_scenario, rollup_scenario, chromium, secure_broker, sample_payloads), never in a test module
that others import (pytest would collect its tests twice over and a rename in one file breaks another)."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_module_imports_another():
    pattern = re.compile(r"^\s*(from tests\.test_\w+ import|import tests\.test_)", re.M)
    offenders = [p.name for p in sorted(TESTS.glob("*.py")) if pattern.search(p.read_text())]
    assert offenders == []


def test_one_free_port_helper():
    defined = [p.name for p in sorted(TESTS.glob("*.py")) if re.search(r"^def free_port\(", p.read_text(), re.M)]
    assert defined == ["services.py"]
