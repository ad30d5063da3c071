"""docs/rest.md runs as written: every ```sh block, in order, against a fresh kv-server behind
Envoy, with only `localhost:8080` changed to the gateway's port.

In a block, a line starting with `$ ` is a command (continued by lines ending in a backslash), a
line starting with `#` is a comment, and the other lines are the output the command before them
prints. `...` in an output line matches any text, and a line that is only `...` matches any
number of lines. One bash process runs a whole block, so shell variables carry over. Set
KV_DOCS_TRANSCRIPT=<file> to write what the commands really printed there.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import StartGateway

pytestmark = pytest.mark.gateway

DOC = Path(__file__).resolve().parents[2] / "docs" / "rest.md"
_FENCE = re.compile(r"^```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)
    line: int = 0


def blocks(text: str) -> list[list[Step]]:
    """The ```sh blocks of a markdown text, as commands with their expected output."""
    found = []
    for match in _FENCE.finditer(text):
        first_line = text.count("\n", 0, match.start(1)) + 1
        steps: list[Step] = []
        continuing = False
        for offset, line in enumerate(match.group(1).splitlines()):
            if continuing:
                steps[-1].command += "\n" + line
                continuing = line.endswith("\\")
            elif line.startswith("$ "):
                steps.append(Step(line[2:], line=first_line + offset))
                continuing = line.endswith("\\")
            elif line.startswith("#") and not (steps and steps[-1].expected):
                continue
            else:
                assert steps, f"docs/rest.md:{first_line + offset}: output before any command"
                steps[-1].expected.append(line)
        found.append(steps)
    return found


def matches(expected: list[str], actual: list[str]) -> bool:
    """Line by line; `...` inside a line matches any text, a line of `...` any lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(matches(expected[1:], actual[index:]) for index in range(len(actual) + 1))
    if not actual:
        return False
    pattern = ".*".join(re.escape(part) for part in expected[0].split("..."))
    return re.fullmatch(pattern, actual[0]) is not None and matches(expected[1:], actual[1:])


def run_block(steps: list[Step], host: str, workdir: Path) -> list[list[str]]:
    """Run a block's commands in one bash; returns each command's output lines."""
    marker = f"@@kv-doc-{uuid.uuid4().hex}@@"
    script = "".join(
        f"{step.command.replace('localhost:8080', host)}\nprintf '\\n%s\\n' '{marker}'\n" for step in steps
    )
    done = subprocess.run(
        ["bash", "--noprofile", "--norc"],
        input=script.encode(),
        capture_output=True,
        cwd=workdir,
        timeout=60,
        check=False,
    )
    outputs = done.stdout.decode(errors="replace").split(f"\n{marker}\n")
    assert len(outputs) == len(steps) + 1, (outputs, done.stderr.decode(errors="replace"))
    return [output.rstrip("\n").splitlines() for output in outputs[:-1]]


def test_the_examples_in_docs_rest_md_print_what_they_show(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway()
    doc_blocks = blocks(DOC.read_text())
    assert len(doc_blocks) >= 5
    transcript = []
    failures = []
    for steps in doc_blocks:
        for step, actual in zip(steps, run_block(steps, gateway.host, tmp_path), strict=True):
            transcript.append(f"$ {step.command}\n" + "".join(line + "\n" for line in actual))
            if not matches(step.expected, actual):
                failures.append(
                    f"docs/rest.md:{step.line}: $ {step.command}\n  expected:\n"
                    + "".join(f"    {line}\n" for line in step.expected)
                    + "  got:\n"
                    + "".join(f"    {line}\n" for line in actual)
                )
    if os.environ.get("KV_DOCS_TRANSCRIPT"):
        Path(os.environ["KV_DOCS_TRANSCRIPT"]).write_text("".join(transcript))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("expected", "actual", "result"),
    [
        (["a"], ["a"], True),
        (["a"], ["b"], False),
        (["a"], [], False),
        ([], ["a"], False),
        (['{"x":"..."}'], ['{"x":"anything"}'], True),
        (["HTTP/1.1 201 Created", "...", "body"], ["HTTP/1.1 201 Created", "h: 1", "h: 2", "", "body"], True),
        (["...", "last"], ["last"], True),
        (["a.b"], ["axb"], False),
    ],
)
def test_the_output_matcher(expected: list[str], actual: list[str], result: bool) -> None:
    assert matches(expected, actual) is result
