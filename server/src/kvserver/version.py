"""The server's version, from its installed distribution."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kv-server")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"
