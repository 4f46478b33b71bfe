"""Kafka-to-Retail Rocket tracking relay.

The flow, one module per stage: ``intake`` → ``decode`` → ``translate`` → ``deliver`` → ``settle`` → commit.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rr-consumer")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
