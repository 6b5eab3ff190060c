"""``python -m gateway`` is the ``tokengate`` command."""

from gateway.cli import main

raise SystemExit(main())
