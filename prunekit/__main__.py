"""``python -m prunekit`` runs the command line (see :mod:`prunekit.cli`)."""

from prunekit.cli import main

raise SystemExit(main())
