"""The ``vlkit`` command line (``vlkit.cli:app``): each module one group of commands, each command parsing its
arguments, calling one library function and printing with rich.

    models.py  list, config, inspect, plan        data.py    data check, data toy
    train.py   train, eval, predict, export       toy.py     toy build, toy pretrain
    ablate.py  ablate, report                     common.py  the app, its groups, consoles, friendly errors
"""
# each registers its commands on the app; this order is `vlkit --help`'s
from vlkit.cli import models  # noqa: F401  isort: skip
from vlkit.cli import data, toy  # noqa: F401  isort: skip
from vlkit.cli import train  # noqa: F401  isort: skip
from vlkit.cli import ablate  # noqa: F401  isort: skip
from vlkit.cli.common import app, console, err_console, friendly


def main() -> None:  # pragma: no cover
    app()


__all__ = ["app", "console", "err_console", "friendly", "main"]
