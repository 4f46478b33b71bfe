"""The one exception tree of the relay.

Every failure the service meets is classified here, once, as *transient* (retry, never dead-letter) or
*permanent* (dead-letter, never block)::

    RelayError
    ├── ConfigError                 the service cannot start: a setting is missing or wrong
    ├── PermanentError              the record can never succeed as it is: dead-letter it
    │   ├── DecodeError             the bytes are not an event this service understands
    │   └── TranslateError          the event breaks the tracking contract or names an unknown shop
    └── TransientError              the record may succeed later: retry with backoff
        └── RegistryUnavailable     the schema registry could not be reached or answered 5xx

Third-party exceptions (aiohttp, confluent-kafka, fastavro) are mapped onto this tree at the module that
talks to them; nothing above that module sees a foreign exception type.
"""

from __future__ import annotations


class RelayError(Exception):
    """Root of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """A setting is missing, of the wrong type, or impossible in combination with another.

    ``setting`` names the setting (dotted path), so the operator knows what to fix.
    """

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class PermanentError(RelayError):
    """The record can never be delivered as it is; it goes to the dead-letter topic with ``reason``."""

    stage: str = "unknown"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DecodeError(PermanentError):
    """The record's bytes could not be decoded into a known domain event."""

    stage = "decode"


class TranslateError(PermanentError):
    """The decoded event cannot become valid tracking calls (contract violation, unknown shop)."""

    stage = "translate"

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.field = field


class TransientError(RelayError):
    """The operation may succeed later; it is retried and never dead-lettered."""


class RegistryUnavailable(TransientError):
    """The schema registry could not be reached, timed out, or answered with a server error."""
