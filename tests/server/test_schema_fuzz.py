"""A bounded schemathesis run against the served /openapi.json: no 5xx, every response matches the schema.

Its own small server (short context, few sequences) keeps generated requests cheap; the run is capped
by examples per operation and by a wall-clock timeout (a few minutes at most).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import start_server

RUN_TIMEOUT_S = 900


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(smollm2_path: str, tmp_path: Path) -> None:
    cli = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    if not Path(cli).exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    srv = start_server(smollm2_path, tmp_path, "--max-model-len", "48", "--max-num-seqs", "4")
    try:
        cmd = [cli, "run", f"{srv.url}/openapi.json", "--url", srv.url,
               "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,"
               "content_type_conformance",
               "--phases", "examples,coverage,fuzzing", "--max-examples", "12", "--seed", "14",
               "--request-timeout", "120", "--suppress-health-check", "all", "--no-shrink",
               "--generation-deterministic"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        report = (proc.stdout + proc.stderr)[-6000:]
        assert proc.returncode == 0, report
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
        assert 'status="500"' not in httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()
