"""What every command shares: the ``vlkit`` Typer app and its groups, the consoles, and :func:`friendly` (known user
errors as one clear message and a non-zero exit)."""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build and compare LLaVA-style vision-language models.")
data_app = typer.Typer(no_args_is_help=True, help="Data tools: generate the toy world's data, check LLaVA files.")
toy_app = typer.Typer(no_args_is_help=True, help="The embedded default toy world.")
app.add_typer(data_app, name="data")
app.add_typer(toy_app, name="toy")

console = Console()
err_console = Console(stderr=True)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@app.callback()
def _quiet_libraries() -> None:
    """Library progress bars (weights loading) would interleave with vlkit's own rich progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Known user errors become one clear message and a non-zero exit, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from vlkit.config import ConfigError
        from vlkit.data.llava import DataError
        from vlkit.registry import RegistryError
        from vlkit.toyworld.shipped import ToyWeightsError

        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            err_console.print(f"[bold red]error:[/] {len(exc.errors)} problem(s) in recipe {exc.source}")
            for e in exc.errors:
                err_console.print(f"  - {e}", markup=False, highlight=False)
            raise typer.Exit(2)
        except (RegistryError, DataError, ToyWeightsError, FileNotFoundError, ValueError, TypeError) as exc:
            err_console.print(f"[bold red]error:[/] {type(exc).__name__}: ", end="")
            err_console.print(str(exc), markup=False, highlight=False, soft_wrap=True)  # paths stay whole
            if exc.__cause__ is not None:
                err_console.print(f"  caused by {type(exc.__cause__).__name__}: {exc.__cause__}", markup=False)
            raise typer.Exit(1)

    return wrapper
