"""The ``kv`` command: argument parsing, the commands, exit statuses."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kvclient._protocol import DEFAULT_TARGET
from kvclient._sync import Client
from kvclient.cli import _bench, _load
from kvclient.cli import _output as out
from kvclient.errors import Conflict, InvalidArgument, KeyNotFound, KvError, Unavailable
from kvclient.models import Tls

__all__ = ["EXIT_CODES", "build_parser", "main"]

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3
EXIT_SERVER = 4

# Exception -> exit status, first match wins.
EXIT_CODES: tuple[tuple[type[KvError], int], ...] = (
    (KeyNotFound, EXIT_NOT_FOUND),
    (InvalidArgument, EXIT_USAGE),
    (Conflict, EXIT_CONFLICT),
    (KvError, EXIT_SERVER),
)

DESCRIPTION = """\
kv: talk to a kv server (put, get, delete, list, watch, status), or load it (bench).

The server is --address, or $KV_ADDRESS, or 127.0.0.1:50051. Every command takes
-o json for machine-readable output (one JSON object per line for watch)."""

EPILOG = """\
examples:
  kv put greeting hello             store a value
  kv get greeting                   print it (raw bytes)
  kv list --prefix app/             table of the keys under app/
  kv watch --prefix app/            follow changes until Ctrl-C
  KV_ADDRESS=10.0.0.5:50051 kv status
  kv bench --duration 10 --preload  load test: calls/s, p50/p90/p99/max latency

exit status:
  0 success, 1 key not found, 2 usage error or invalid request,
  3 condition failed, 4 connection or server error"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text!r}")
    return value


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The connection and output options, accepted before and after the command."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "-a",
        "--address",
        metavar="HOST:PORT",
        default=default(os.environ.get("KV_ADDRESS") or DEFAULT_TARGET),
        help=f"the server (default: $KV_ADDRESS or {DEFAULT_TARGET})",
    )
    group.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        default=default("text"),
        help="output format (default: text)",
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        default=default(10.0),
        help="time limit of each call (default: 10)",
    )
    group.add_argument("--tls", action="store_true", default=default(False), help="use TLS")
    group.add_argument("--tls-ca", metavar="FILE", default=default(None), help="PEM roots (implies --tls)")
    group.add_argument(
        "--tls-cert", metavar="FILE", default=default(None), help="PEM client certificate (mTLS)"
    )
    group.add_argument("--tls-key", metavar="FILE", default=default(None), help="PEM client key (mTLS)")
    group.add_argument(
        "--tls-server-name", metavar="NAME", default=default(None), help="expected server name"
    )
    group.add_argument(
        "--token",
        default=default(os.environ.get("KV_TOKEN")),
        help="bearer token (default: $KV_TOKEN)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``kv`` command."""
    parser = argparse.ArgumentParser(
        prog="kv", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter
    )
    _add_common(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, examples: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog="examples:\n" + examples,
            formatter_class=_Formatter,
        )
        _add_common(sub, top=False)
        return sub

    put = command(
        "put",
        "Create or replace a key.",
        "  kv put greeting hello\n"
        "  kv put session/42 token --ttl 1.5          expires after 1.5 s\n"
        "  kv put lock owner-a --if-absent            create only (exit 3 if it exists)\n"
        "  kv put config v2 --if-mod-revision 17      compare-and-set\n"
        "  kv put photo - < photo.jpg                 the value from standard input",
    )
    put.add_argument("key", metavar="KEY")
    put.add_argument("value", metavar="VALUE", help="the value, or - to read standard input (binary-safe)")
    put.add_argument(
        "--ttl",
        type=_positive_float,
        metavar="SECONDS",
        help="time to live (millisecond precision, e.g. 1.5)",
    )
    only = put.add_mutually_exclusive_group()
    only.add_argument("--if-absent", action="store_true", help="only create: fail if the key exists")
    only.add_argument("--if-present", action="store_true", help="only update: fail if the key is absent")
    put.add_argument(
        "--if-mod-revision", type=_positive_int, metavar="N", help="only if the key's mod_revision is N"
    )
    put.add_argument("--if-version", type=_positive_int, metavar="N", help="only if the key's version is N")
    put.add_argument("--content-type", metavar="TYPE", help="media type kept with the value")
    put.add_argument("--prev", action="store_true", help="show the previous entry (with -o json)")
    put.set_defaults(run=_put)

    get = command(
        "get",
        "Print the value of a key (raw bytes; -o json for the metadata).",
        "  kv get greeting\n  kv get photo > photo.jpg\n  kv get greeting -o json",
    )
    get.add_argument("key", metavar="KEY")
    get.set_defaults(run=_get)

    delete = command(
        "delete",
        "Delete a key, or every key under a prefix.",
        "  kv delete greeting\n"
        "  kv delete session/ --prefix               every key starting with session/\n"
        "  kv delete maybe --allow-missing           no error if it does not exist",
    )
    delete.add_argument("key", metavar="KEY", help="the key, or with --prefix the prefix")
    delete.add_argument("--prefix", action="store_true", help="delete every key that starts with KEY")
    delete.add_argument("--allow-missing", action="store_true", help="succeed if the key does not exist")
    delete.add_argument(
        "--if-mod-revision", type=_positive_int, metavar="N", help="only if mod_revision is N"
    )
    delete.add_argument("--if-version", type=_positive_int, metavar="N", help="only if version is N")
    delete.add_argument("--prev", action="store_true", help="show the deleted entries (with -o json)")
    delete.set_defaults(run=_delete)

    lst = command(
        "list",
        "List keys in order, as a table (all pages, one snapshot).",
        "  kv list\n  kv list --prefix app/ --keys-only\n  kv list --limit 10 -o json",
    )
    lst.add_argument("--prefix", default="", metavar="P", help="only keys starting with P")
    lst.add_argument("--start", default="", metavar="KEY", help="first key (inclusive)")
    lst.add_argument("--end", default="", metavar="KEY", help="end key (exclusive)")
    lst.add_argument("--keys-only", action="store_true", help="leave the values out")
    lst.add_argument("--limit", type=_positive_int, metavar="N", help="show at most N keys")
    lst.add_argument("--page-size", type=_positive_int, metavar="N", help="keys per request")
    lst.set_defaults(run=_list)

    watch = command(
        "watch",
        "Print changes as they happen, one line each, until interrupted (Ctrl-C).",
        "  kv watch greeting\n"
        "  kv watch --prefix app/\n"
        "  kv watch --prefix '' --start-revision 120 -o json     everything since revision 120",
    )
    target = watch.add_mutually_exclusive_group()
    target.add_argument("key", nargs="?", metavar="KEY", help="the key to watch")
    target.add_argument("--prefix", metavar="P", help="watch every key starting with P ('' for all)")
    watch.add_argument("--start-revision", type=_positive_int, metavar="R", help="replay from revision R")
    watch.add_argument("--initial", action="store_true", help="print the current entries first")
    watch.add_argument("--prev", action="store_true", help="show the previous value of each change")
    watch.set_defaults(run=_watch)

    status = command("status", "Show the server's revision, store, key count and limits.", "  kv status")
    status.set_defaults(run=_status)
    _load.add_parser(command)

    bench = command(
        "bench",
        "Load the server with Gets and Puts; report throughput and latency percentiles.",
        "",
    )
    _bench.configure(bench)  # its options, description and examples, and set_defaults(bench=...)
    return parser


# --------------------------------------------------------------------------- output helpers


def _emit(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _emit_json(obj: dict[str, Any]) -> None:
    _emit(json.dumps(obj, ensure_ascii=False))


def _check_text(parser: argparse.ArgumentParser, name: str, value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        parser.error(f"{name} must be valid UTF-8")
    return value


# --------------------------------------------------------------------------- commands

Command = Callable[[Client, argparse.Namespace], int]


def _put(client: Client, args: argparse.Namespace) -> int:
    # os.fsencode gives back the exact bytes of the argument (binary-safe, like '-').
    value = sys.stdin.buffer.read() if args.value == "-" else os.fsencode(args.value)
    result = client.put(
        args.key,
        value,
        ttl=args.ttl,
        if_absent=args.if_absent,
        if_present=args.if_present,
        if_mod_revision=args.if_mod_revision,
        if_version=args.if_version,
        return_previous=args.prev,
        content_type=args.content_type,
    )
    if args.output == "json":
        _emit_json(out.put_json(result))
    else:
        _emit(out.put_text(result))
    return EXIT_OK


def _get(client: Client, args: argparse.Namespace) -> int:
    entry = client.get(args.key)
    if args.output == "json":
        _emit_json(out.entry_json(entry))
        return EXIT_OK
    stream = sys.stdout.buffer
    stream.write(entry.value)
    if sys.stdout.isatty() and entry.value and not entry.value.endswith(b"\n"):
        stream.write(b"\n")  # keep the prompt on its own line; pipes get the exact bytes
    stream.flush()
    return EXIT_OK


def _delete(client: Client, args: argparse.Namespace) -> int:
    result = client.delete(
        args.key,
        prefix=args.prefix,
        allow_missing=args.allow_missing,
        if_mod_revision=args.if_mod_revision,
        if_version=args.if_version,
        return_previous=args.prev,
    )
    if args.output == "json":
        _emit_json(out.delete_json(result, with_previous=args.prev))
    else:
        _emit(out.delete_text(result, args.key, prefix=args.prefix))
    return EXIT_OK


def _list(client: Client, args: argparse.Namespace) -> int:
    result = client.list(
        args.prefix,
        start_key=args.start,
        end_key=args.end,
        keys_only=args.keys_only,
        limit=args.limit,
        page_size=args.page_size,
        include_count=args.limit is not None,
    )
    if args.output == "json":
        _emit_json(out.list_json(result, keys_only=args.keys_only))
    elif args.keys_only and not sys.stdout.isatty():
        for entry in result.entries:  # one key per line for scripts (xargs, while read)
            _emit(entry.key)
    else:
        for line in out.list_table(result, keys_only=args.keys_only):
            _emit(line)
    return EXIT_OK


def _watch(client: Client, args: argparse.Namespace) -> int:
    prefix = args.prefix is not None or args.key is None
    key = (args.prefix or "") if prefix else args.key
    with client.watch(
        key,
        prefix=prefix,
        start_revision=args.start_revision,
        include_initial_state=args.initial,
        include_previous=args.prev,
    ) as watch:
        for event in watch:
            if args.output == "json":
                _emit_json(out.event_json(event))
            else:
                _emit(out.event_text(event))
    return EXIT_OK


def _status(client: Client, args: argparse.Namespace) -> int:
    status = client.status()
    if args.output == "json":
        _emit_json(out.status_json(status))
    else:
        for line in out.status_text(status):
            _emit(line)
    return EXIT_OK


# --------------------------------------------------------------------------- main


def _fail(message: str, status: int) -> int:
    sys.stderr.write(f"kv: {message}\n")
    sys.stderr.flush()
    return status


def _error_message(error: KvError, args: argparse.Namespace) -> str:
    if isinstance(error, Unavailable):
        return f"cannot reach the server at {args.address}: {error}"
    key = getattr(args, "key", None)
    if isinstance(error, KeyNotFound) and key and key not in str(error):
        return f"{key}: {error}"
    return str(error)


def _tls(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Tls | bool:
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    files = (args.tls_ca, args.tls_cert, args.tls_key)
    if not any(files) and not args.tls_server_name:
        return bool(args.tls)
    try:
        return Tls.from_files(*files, server_name=args.tls_server_name)
    except OSError as error:
        parser.error(f"cannot read {error.filename}: {error.strerror}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kv`` with ``argv`` (default: the command line) and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("key", "value", "prefix", "start", "end"):
        if isinstance(getattr(args, name, None), str) and not (name == "value" and args.command == "put"):
            _check_text(parser, name.upper(), getattr(args, name))
    tls = _tls(args, parser)
    bench: Callable[[argparse.Namespace, Tls | bool], int] | None = getattr(args, "bench", None)
    try:
        if bench is not None:  # kv bench opens its own channels (or REST connections), many of them
            return bench(args, tls)
        run: Command = args.run
        with Client(args.address, timeout=args.timeout, tls=tls, token=args.token) as client:
            return run(client, args)
    except KvError as error:
        status = next(code for cls, code in EXIT_CODES if isinstance(error, cls))
        return _fail(_error_message(error, args), status)
    except KeyboardInterrupt:
        # Ctrl-C ends `kv watch` normally; any other command was interrupted.
        return EXIT_OK if args.command == "watch" else 130
    except BrokenPipeError:
        # The reader went away (kv list | head): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as error:  # never a traceback, unless asked for
        if os.environ.get("KV_DEBUG"):
            raise
        return _fail(
            f"unexpected error: {type(error).__name__}: {error} (KV_DEBUG=1 for details)", EXIT_SERVER
        )
