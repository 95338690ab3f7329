"""The command-line tool `pccore` (`compare`, `train`): `_main.py` parses and runs the
commands, `_options.py` maps option names to variants, parameterisations and inference
methods, `_run.py` trains, `_report.py` writes the table, JSON and figure."""

from ._main import main as main

__all__ = ["main"]
