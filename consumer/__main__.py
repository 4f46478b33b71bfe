"""``python -m consumer`` is ``rr-consumer``."""

from consumer.cli import main

raise SystemExit(main())
