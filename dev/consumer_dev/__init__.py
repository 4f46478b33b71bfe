"""rr-consumer's development tools: the tracking API emulator and the shop traffic generator and producer.

A distribution of its own (``rr-consumer-dev``, ``dev/pyproject.toml``) so that the runtime wheel and the
production image carry none of it; the tests, the local stack (``make run``) and the benchmarks use it, and it
adds the ``emulator`` and ``produce-sample`` commands to ``rr-consumer`` (see :mod:`consumer_dev.cli`). It
depends on the runtime package; the runtime package never imports it.
"""
