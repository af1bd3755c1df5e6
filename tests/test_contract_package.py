"""The wire contract is one package that edge and sink both import and that imports neither (issue 12 §1)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level package names each module of ``package`` imports (absolute imports, any depth in the file)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def test_contract_imports_neither_side():
    offenders = {f: n & {"camera", "cloud_sink", "models"} for f, n in _imported_packages("contract").items()}
    assert len(offenders) >= 7  # schema, topics, ids, timestamps, batch, rollup, broker
    assert not {f: n for f, n in offenders.items() if n}


def test_sink_does_not_import_the_edge():
    offenders = {f: n & {"camera"} for f, n in _imported_packages("cloud_sink").items()}
    assert not {f: n for f, n in offenders.items() if n}


def test_contract_needs_only_the_standard_library_at_import():
    """The edge installs the contract: importing it must not pull jsonschema, paho or sqlalchemy."""
    code = ("import sys, contract.schema, contract.topics, contract.ids, contract.timestamps, contract.batch, "
            "contract.rollup, contract.broker; "
            "print(sorted(m for m in ('jsonschema', 'paho', 'sqlalchemy', 'numpy', 'camera', 'cloud_sink') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_schemas_ship_with_the_contract():
    from contract.schema import load_schema

    for name in ("event.v1.schema.json", "stats.v1.schema.json", "summary.v1.schema.json"):
        assert load_schema(name)["$schema"]
