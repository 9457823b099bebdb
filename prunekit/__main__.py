"""``python -m prunekit`` runs the command line (see :mod:`prunekit.cli.main`)."""

from prunekit.cli.main import main

raise SystemExit(main())
