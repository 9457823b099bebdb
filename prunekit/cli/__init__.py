"""The ``prunekit`` command line: verbs, the YAML job, model/data building, report, demo.

The top layer: it may import everything below it, nothing imports it.
"""

from prunekit.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
