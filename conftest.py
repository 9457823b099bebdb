"""Repository-wide pytest options: ``--runslow`` also runs the tests marked ``slow``.

``pyproject.toml`` deselects them by default (``addopts = -m 'not slow'``); ``pytest -m slow``
runs only them, ``pytest --runslow`` runs everything.
"""


def pytest_addoption(parser):
    parser.addoption(
        "--runslow", action="store_true", default=False, help="also run the tests marked slow (model-zoo sweeps)"
    )


def pytest_configure(config):
    if config.getoption("runslow") and config.option.markexpr.strip() in ("not slow", "'not slow'"):
        config.option.markexpr = ""
