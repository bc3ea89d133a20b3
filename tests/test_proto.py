"""The admin API's generated Python code is what scripts/gen-proto.sh produces right now.

A proto edit without regenerating (or a hand edit of generated code) fails here, not at a
user's first `router-ext status`.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "router_ext" / "api" / "v1"
BUF = ROOT / "node_modules" / ".bin" / "buf"


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    fresh = sorted(p.name for p in tmp_path.iterdir())
    assert fresh == ["admin_pb2.py", "admin_pb2_grpc.py"]
    stale = [n for n in fresh if not filecmp.cmp(tmp_path / n, GENERATED / n, shallow=False)]
    assert not stale, f"regenerate with scripts/gen-proto.sh: {stale} differ"


def test_buf_lint_passes() -> None:
    buf = str(BUF) if BUF.exists() else shutil.which("buf")
    if buf is None:
        if os.environ.get("CI"):  # CI installs it (make tools): missing there is a failure
            pytest.fail("buf not installed (scripts/install-tools.sh)")
        pytest.skip("buf not installed (scripts/install-tools.sh)")
    out = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
