"""kd pipeline stages: one module per stage, each with a plain `run(...)` at its core."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kd")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+source"
