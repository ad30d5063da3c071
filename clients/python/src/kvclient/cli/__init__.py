"""The ``kv`` command-line tool (console script ``kv = kvclient.cli:main``).

Run ``kv --help`` (and ``kv COMMAND --help``) for the commands, options and examples.
"""

from kvclient.cli._app import EXIT_CODES, build_parser, main

__all__ = ["EXIT_CODES", "build_parser", "main"]
