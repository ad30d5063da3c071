"""The examples of clients/python/USAGE.md and of the README, executed against a real server.

Every ```python block runs, in order, in its own interpreter against one fresh server (the
address in the text replaced by the fixture's). The ```console blocks are shell sessions: every
`$ command` runs, in order, against another fresh server, and its output must be what the page
shows, once times, durations, versions and process ids are masked and runs of spaces collapsed.
`kv watch` runs until it has printed the lines shown (the `^C`), then gets SIGINT and must exit 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
DOCS = {"usage": ROOT / "clients" / "python" / "USAGE.md", "readme": ROOT / "README.md"}
DOC_ADDRESS = "127.0.0.1:50051"
BIN = Path(sys.executable).parent

_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_MASKS = [
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z"), "<time>"),
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"), "<time>"),
    (re.compile(r"\(127\.0\.0\.1:\d+/\d+\)"), "(<server id>)"),
    (re.compile(r"\b\d+\.\d+\.\d+\b"), "<version>"),
    (re.compile(r"\b\d+(?:\.\d+)?(?:ms|s)\b|\b\d+m\d\ds\b|\b\d+h\d\dm\b|\b\d+d\d\dh\b"), "<duration>"),
    (re.compile(r"[ \t]+"), " "),
]


def blocks(language: str, doc: str = "usage") -> list[str]:
    return [body for lang, body in _BLOCK.findall(DOCS[doc].read_text()) if lang == language]


def mask(text: str) -> list[str]:
    lines = []
    for line in text.strip("\n").splitlines():
        for pattern, replacement in _MASKS:
            line = pattern.sub(replacement, line)
        lines.append(line.strip())
    return lines


def test_the_page_has_examples_of_both_kinds() -> None:
    assert len(blocks("python")) >= 6
    assert len(blocks("console")) >= 4


@pytest.mark.parametrize("doc", list(DOCS))
def test_python_examples_run(kv_server: ServerProcess, tmp_path: Path, doc: str) -> None:
    env = {**os.environ}
    assert blocks("python", doc)
    for number, code in enumerate(blocks("python", doc)):
        assert DOC_ADDRESS in code or "def " in code
        done = subprocess.run(  # noqa: S603
            [sys.executable, "-c", code.replace(DOC_ADDRESS, kv_server.address)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"python block {number} failed:\n{code}\n{done.stderr.decode()}"
        assert done.stderr == b"", done.stderr.decode()


def _sessions(doc: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for every `$ ` line of the console blocks, in order."""
    steps: list[tuple[str, list[str]]] = []
    for body in blocks("console", doc):
        for line in body.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                assert steps, f"output before any command: {line!r}"
                steps[-1][1].append(line)
    return steps


def _watch(command: str, expected: list[str], env: dict[str, str], cwd: Path) -> str:
    assert expected[-1] == "^C"
    process = subprocess.Popen(  # noqa: S603
        ["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        lines = [process.stdout.readline().decode() for _ in expected[:-1]]
        time.sleep(0.3)  # anything more would be an extra line
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0
        rest = process.stdout.read().decode()
        assert process.stderr.read() == b""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        process.stdout.close()
        process.stderr.close()
    return "".join(lines) + rest + "^C\n"


@pytest.mark.parametrize("doc", list(DOCS))
def test_cli_examples_print_what_the_page_shows(kv_server: ServerProcess, tmp_path: Path, doc: str) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("KV_TOKEN", None)
    env.pop("KV_ADDRESS", None)
    status = 0
    assert _sessions(doc)
    for command, expected in _sessions(doc):
        command = command.replace(DOC_ADDRESS, kv_server.address)
        if command.startswith("export "):
            name, _, value = command[len("export ") :].partition("=")
            env[name] = value
            output = ""
        elif command == "echo $?":
            output = f"{status}\n"
        elif command.startswith("kv watch"):
            output = _watch(command, expected, env, tmp_path)
            status = 0
        else:
            done = subprocess.run(  # noqa: S603
                ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, timeout=60, check=False
            )
            status = done.returncode
            output = done.stdout.decode() + done.stderr.decode()
            if status not in (1, 3, 4):
                assert status == 0, f"{command!r} exited {status}: {output}"
        shown = "\n".join(expected).replace(DOC_ADDRESS, kv_server.address)
        assert mask(output) == mask(shown), f"$ {command}"


def test_masking_keeps_what_matters() -> None:
    assert mask("updated greeting (revision 2, version 2, expires in 1m30s)") == [
        "updated greeting (revision 2, version 2, expires in <duration>)"
    ]
    assert mask("a   1  59m59s  x") == mask("a 1 1h00m x") == ["a 1 <duration> x"]
    assert mask("revision 9") != mask("revision 10")


@pytest.mark.parametrize("language", ["python", "console"])
def test_blocks_use_the_documented_address(language: str) -> None:
    text = "".join(blocks(language))
    assert DOC_ADDRESS in text
