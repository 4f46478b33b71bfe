"""Logging: structlog, JSON lines in production, a readable console in a terminal.

Every delivery-related line carries topic, partition, offset, shop and method where it has them. Secrets
never reach a log line: the client masks ``apiKey`` in anything it logs, and :func:`scrub_secrets` is the
last line of defence for any text that might hold one. librdkafka's own lines come through
:class:`KafkaLog` into the same log, folded when they repeat.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

Format = Literal["auto", "json", "console"]


def configure(level: str = "info", fmt: Format = "auto", secrets: Iterable[str] = ()) -> None:
    renderer: Processor
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            SecretScrubber(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


class SecretScrubber:
    """A structlog processor that masks every known secret in every string value of an event."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = [s for s in secrets if s]

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
        if not self._secrets:
            return event
        return {key: self._scrub(value) for key, value in event.items()}

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, "***")
            return value
        if isinstance(value, dict):
            return {k: self._scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._scrub(v) for v in value)
        return value


# --- librdkafka's own log lines -----------------------------------------------------------------------

#: Lines of one kind (level, facility, broker, text with its numbers aside) within this long are one line,
#: and one more later that counts the rest: a broker that is down is retried about 20 times a second.
FOLD_WINDOW_S: Final = 10.0
#: Kinds of line remembered at once; past that the oldest is let go (its count logged first).
FOLD_KINDS: Final = 256
_LEVELS: Final[Mapping[int, str]] = {
    logging.CRITICAL: "critical",
    logging.ERROR: "error",
    logging.WARNING: "warning",
    logging.INFO: "info",
    logging.DEBUG: "debug",
}
#: ``[thrd:127.0.0.1:9092/1]: `` in front of every line: the librdkafka thread that wrote it.
_THREAD: Final = re.compile(r"\[thrd:(?P<thread>[^\]]*)\]: ")
#: ``127.0.0.1:9092/1: `` or ``127.0.0.1:9092/bootstrap: `` in front of a line about one broker.
_BROKER: Final = re.compile(r"(?P<broker>[^\s/]+/[^\s:]+): ")
_NUMBER: Final = re.compile(r"\d+")


class KafkaLog(logging.Logger):
    """What confluent-kafka's ``logger`` setting takes for one client: librdkafka's lines as ``kafka.log``
    events of the relay's own log, never raw ``%3|...`` lines on stderr.

    Each event names the ``client`` (``consumer``, ``dead-letter-producer``), librdkafka's ``facility``
    (``FAIL``, ``REQTMOUT``...), the ``broker`` when the line is about one, and the ``message``, at the
    line's level. Repeats are folded: a line of a kind seen in the last :data:`FOLD_WINDOW_S` seconds is only
    counted, and once its window is over one more line of that kind carries ``repeated: N``, the number held
    back. So every line librdkafka wrote is one event, or counted in one.

    confluent-kafka hands these lines over only from the client's ``poll()``, ``consume()`` or ``flush()``,
    on the thread that calls it (with a ``logger`` set, librdkafka queues its lines instead of writing them
    from its own threads); a lock keeps two such threads apart. :meth:`flush` logs the counts still held:
    the client's owner calls it once the client is closed.
    """

    def __init__(
        self, client: str, *, window_s: float = FOLD_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(f"kafka.{client}")
        self.propagate = False
        self.handler = _FoldingHandler(client, window_s, clock)
        self.addHandler(self.handler)

    def flush(self) -> None:
        """Log the count of every kind of line still held back."""
        self.handler.flush()


class _FoldingHandler(logging.Handler):
    def __init__(self, client: str, window_s: float, clock: Callable[[], float]) -> None:
        super().__init__()
        self._client = client
        self._window_s = window_s
        self._clock = clock
        # kind -> [window end, lines held back, the fields of the kind's last logged line]
        self._held: dict[tuple[str, ...], list[Any]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._fold(record)
        except Exception:  # noqa: BLE001 - never into librdkafka: a raise here would crash the poll
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # Handler.createLock() made it
            try:
                for kind in list(self._held):
                    self._release(kind)
            except Exception:  # noqa: BLE001 - a client's owner flushes on its way out: never raise there
                self.handleError(logging.makeLogRecord({"msg": "kafka.log: flushing the counts held back"}))

    def _fold(self, record: logging.LogRecord) -> None:
        fields = self._fields(record)
        kind = (
            fields["level"],
            fields["facility"],
            fields["broker"] or "",
            _NUMBER.sub("#", fields["message"]),
        )
        now = self._clock()
        for other in [k for k, (end, _, _) in self._held.items() if end <= now]:
            self._release(other)  # windows that are over: their counts go out now
        held = self._held.get(kind)
        if held is not None:
            held[1] += 1
            return
        if len(self._held) >= FOLD_KINDS:
            self._release(next(iter(self._held)))
        self._held[kind] = [now + self._window_s, 0, fields]
        self._log(fields)

    def _release(self, kind: tuple[str, ...]) -> None:
        _, count, fields = self._held.pop(kind)
        if count:
            self._log(fields, repeated=count)

    def _fields(self, record: logging.LogRecord) -> dict[str, Any]:
        if isinstance(record.args, tuple) and len(record.args) == 3:
            facility, instance, text = (str(arg) for arg in record.args)  # "%s [%s] %s": fac, name, line
        else:
            facility, instance, text = "", "", record.getMessage()
        thread = _THREAD.match(text)
        if thread is not None:
            text = text[thread.end() :]
        broker = _BROKER.match(text)
        if broker is not None:
            text = text[broker.end() :]
        name = (
            broker["broker"] if broker else (thread["thread"] if thread and "/" in thread["thread"] else None)
        )
        level = _LEVELS.get(record.levelno, "error" if record.levelno > logging.WARNING else "debug")
        return {"level": level, "facility": facility, "broker": name, "message": text, "instance": instance}

    def _log(self, fields: dict[str, Any], **extra: Any) -> None:
        # Looked up each time, not kept: a kept one would stay bound to the configuration of its first use.
        getattr(structlog.get_logger("consumer.kafka"), fields["level"])(
            "kafka.log",
            client=self._client,
            facility=fields["facility"],
            broker=fields["broker"],
            message=fields["message"],
            instance=fields["instance"],
            **extra,
        )
