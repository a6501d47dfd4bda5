"""schemathesis against a real server: every check (server errors, answers that break the
document, schema-valid requests refused, invalid ones accepted, 405s without `Allow`, auth that
is declared but not enforced), the stateful phase following the document's links, a fixed seed
and a bounded number of examples. `make fuzz` runs the same with many more."""

from __future__ import annotations

import re
from pathlib import Path

from .fuzz import api_run

EXAMPLES = 15  # per operation and phase: about 20 s here


def test_the_api_holds_to_its_openapi_document(tmp_path: Path) -> None:
    code, report = api_run.run(tmp_path, EXAMPLES)
    assert code == 0, report
    summary = re.search(r"(\d+) generated, (\d+) passed", report)
    assert summary and summary[1] == summary[2] and int(summary[1]) > 1000, report
