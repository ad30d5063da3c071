"""``kv load``: write keys from a file of JSON lines, in batches (BatchPut through put_many)."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from kvclient._protocol import MAX_BATCH_PUTS
from kvclient._sync import Client
from kvclient.errors import InvalidArgument, KvError
from kvclient.models import PutItem

__all__ = ["DEFAULT_BATCH_SIZE", "add_parser", "run"]

DEFAULT_BATCH_SIZE = 500
# Refused puts reported one per line on standard error; the count covers the rest (-o json: all).
_REPORTED_FAILURES = 10
_FIELDS = {"key", "value", "ttl"}
# "puts[3].key: ..." (the server) or "items[3]: ..." (the client): the put at index 3 of a batch.
_INDEX = re.compile(r"(puts|items)\[(\d+)\](?:\.|: )?(.*)", re.DOTALL)

SUMMARY = 'Write keys from JSON lines ({"key": ..., "value": ...}), in batches.'
EXAMPLES = (
    "  kv load keys.jsonl                       one JSON object per line\n"
    '  echo \'{"key": "a", "value": "1", "ttl": 60}\' | kv load -\n'
    "  kv load keys.jsonl --batch-size 1000 -o json\n"
    "  kv load keys.jsonl --if-absent           never replace a key (exit 3 if one exists)"
)
DETAILS = """\
Each line of FILE (or standard input for -) is a JSON object: "key" (a string), "value" (a
string, stored as its UTF-8 bytes) and optionally "ttl" (seconds to live). Blank lines are
skipped. The lines are sent in batches of --batch-size puts (BatchPut), one batch after the
other; each put applies on its own, in file order. A line that is not such an object stops the
load before its batch is sent (exit 2; the batches before it were written). A put the server
refuses (--if-absent and the key exists, or a storage failure) is reported on standard error
and the others are still written; the exit status is then that of the first refusal."""


@dataclass
class _Summary:
    lines: int = 0
    loaded: int = 0
    batches: int = 0
    revision: int = 0
    failures: list[tuple[int, str, KvError]] = field(default_factory=list)


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 < value <= MAX_BATCH_PUTS:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_BATCH_PUTS}: {text!r}")
    return value


def add_parser(command: Callable[[str, str, str], argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``kv load`` with the ``command(name, summary, examples)`` factory of ``build_parser``."""
    load = command("load", SUMMARY, EXAMPLES)
    load.description = f"{SUMMARY}\n\n{DETAILS}"
    load.add_argument("file", metavar="FILE", help="JSON lines to load, or - for standard input")
    load.add_argument(
        "--batch-size",
        type=_batch_size,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"puts per BatchPut call (default: {DEFAULT_BATCH_SIZE}, at most {MAX_BATCH_PUTS})",
    )
    load.add_argument("--if-absent", action="store_true", help="only create keys: never replace one")
    load.set_defaults(run=run)
    return load


def _item(line: str, where: str, if_absent: bool) -> PutItem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"{where}: not JSON: {error.msg}") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f'{where}: expected a JSON object {{"key": ..., "value": ...}}')
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise InvalidArgument(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
    key, value, ttl = obj.get("key"), obj.get("value"), obj.get("ttl")
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f'{where}: "key" must be a non-empty string')
    if not isinstance(value, str):
        raise InvalidArgument(f'{where}: "value" must be a string')
    if ttl is not None and (
        isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0
    ):
        raise InvalidArgument(f'{where}: "ttl" must be a positive number of seconds')
    return PutItem(key, value, ttl=ttl, if_absent=if_absent)


def _batches(stream: IO[str], name: str, size: int, if_absent: bool) -> Iterator[list[tuple[int, PutItem]]]:
    """The items of the file with their line numbers, ``size`` at a time; a bad line raises
    InvalidArgument (naming the file and line) before its batch is yielded."""
    batch: list[tuple[int, PutItem]] = []
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        batch.append((number, _item(line, f"{name}:{number}", if_absent)))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _open(path: str) -> IO[str]:
    if path == "-":
        return sys.stdin
    try:
        return open(path, encoding="utf-8")  # closed by _load()
    except OSError as error:
        raise InvalidArgument(f"cannot read {path}: {error.strerror}") from None


def _load(client: Client, args: argparse.Namespace, summary: _Summary) -> None:
    name = "<stdin>" if args.file == "-" else args.file
    stream = _open(args.file)
    try:
        for batch in _batches(stream, name, args.batch_size, args.if_absent):
            try:
                result = client.put_many([item for _, item in batch], batch_size=args.batch_size)
            except InvalidArgument as error:  # name the line, not the index in the batch
                found = _INDEX.match(str(error))
                if found is None:
                    raise
                line = batch[int(found.group(2))][0]
                raise InvalidArgument(f"{name}:{line}: {found.group(3) or str(error)}") from None
            summary.lines += len(batch)
            summary.batches += 1
            summary.revision = max(summary.revision, result.revision)
            for (number, item), outcome in zip(batch, result, strict=True):
                if outcome.error is None:
                    summary.loaded += 1
                else:
                    summary.failures.append((number, item.key, outcome.error))
                    if len(summary.failures) <= _REPORTED_FAILURES:
                        _report(f"{name}:{number}: {item.key}: {outcome.error}")
    except UnicodeDecodeError as error:
        raise InvalidArgument(f"{name}: not UTF-8 text ({error.reason})") from None
    except InvalidArgument as error:
        if summary.batches:
            raise InvalidArgument(f"{error} (stopped after {summary.loaded} keys were loaded)") from None
        raise
    finally:
        if stream is not sys.stdin:
            stream.close()


def _report(message: str) -> None:
    sys.stderr.write(f"kv: {message}\n")
    sys.stderr.flush()


def _json(summary: _Summary) -> dict[str, Any]:
    return {
        "loaded": summary.loaded,
        "failed": len(summary.failures),
        "batches": summary.batches,
        "revision": summary.revision,
        "failures": [
            {
                "line": number,
                "key": key,
                "code": error.code.name if error.code is not None else None,
                "message": str(error),
            }
            for number, key, error in summary.failures
        ],
    }


def _text(summary: _Summary) -> str:
    batches = f"{summary.batches} batch" + ("" if summary.batches == 1 else "es")
    if not summary.failures:
        return f"loaded {summary.loaded} keys in {batches} (revision {summary.revision})"
    return (
        f"loaded {summary.loaded} of {summary.lines} keys in {batches} (revision {summary.revision}); "
        f"{len(summary.failures)} failed"
    )


def run(client: Client, args: argparse.Namespace) -> int:
    """Run ``kv load``; the exit status follows ``kv``'s (``_app.EXIT_CODES``)."""
    from kvclient.cli._app import EXIT_CODES, EXIT_OK  # here: _app imports this module

    summary = _Summary()
    _load(client, args, summary)
    if args.output == "json":
        sys.stdout.write(json.dumps(_json(summary), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(_text(summary) + "\n")
    sys.stdout.flush()
    if not summary.failures:
        return EXIT_OK
    if len(summary.failures) > _REPORTED_FAILURES:
        _report(f"... and {len(summary.failures) - _REPORTED_FAILURES} more refused puts")
    first = summary.failures[0][2]
    return next(code for cls, code in EXIT_CODES if isinstance(first, cls))
