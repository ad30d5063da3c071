"""``python -m kvclient.cli``: the same as the ``kv`` command."""

import sys

from kvclient.cli import main

sys.exit(main())
