"""The committed TypeScript and Go stubs are what the pinned generators write from proto/, with
protoc (scripts/generate_polyglot.py, the source of truth) and with buf (the buf.gen.yaml
templates that docs/any-language.md shows)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 90.0
# What buf serialises differently from protoc: the embedded descriptors (buf writes the options of
# google.api.http in another field order) and the protoc version line of Go files.
EMBEDDED_DESCRIPTOR = re.compile(r'fileDesc\("|^\s*(0x[0-9a-f]{2},\s*)+$|^// \tprotoc ')


@pytest.mark.timeout(240)  # npm ci, if node_modules is missing, then protoc
def test_committed_stubs_are_up_to_date(
    ts_package: Path, require_tool: Callable[[str, str], str], run_bounded: Callable[..., str]
) -> None:
    require_tool("protoc-gen-go", "Debian package protoc-gen-go")
    require_tool("protoc-gen-go-grpc", "Debian package protoc-gen-go-grpc")
    output = run_bounded(
        [sys.executable, "scripts/generate_polyglot.py", "--check"], cwd=ROOT, timeout_s=TIMEOUT_S
    )
    assert "is up to date" in output


def comparable(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not EMBEDDED_DESCRIPTOR.search(line)]


@pytest.mark.parametrize(
    ("template", "extra", "committed", "pattern"),
    [
        ("clients/typescript/buf.gen.yaml", ["--include-imports"], "clients/typescript/src/gen", "*.ts"),
        ("clients/go/buf.gen.yaml", [], "clients/go", "*.pb.go"),
    ],
    ids=["typescript", "go"],
)
@pytest.mark.timeout(240)
def test_buf_template_writes_the_committed_code(
    template: str,
    extra: list[str],
    committed: str,
    pattern: str,
    tmp_path: Path,
    ts_package: Path,
    require_tool: Callable[[str, str], str],
    run_bounded: Callable[..., str],
) -> None:
    require_tool("protoc-gen-go", "Debian package protoc-gen-go")
    run_bounded(
        ["scripts/buf.sh", "generate", "proto", "--template", template, *extra, "-o", str(tmp_path)],
        cwd=ROOT,
        timeout_s=TIMEOUT_S,
    )
    fresh_root = tmp_path / committed
    fresh = sorted(path.relative_to(fresh_root) for path in fresh_root.rglob(pattern))
    current = sorted(path.relative_to(ROOT / committed) for path in (ROOT / committed).rglob(pattern))
    assert fresh == current
    for path in fresh:
        assert comparable(fresh_root / path) == comparable(ROOT / committed / path), path
