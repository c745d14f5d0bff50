"""What every subcommand shares: the stderr console and the one-line error wrapper."""

from __future__ import annotations

import functools
import sys

import click
from rich.console import Console

from tbpw.errors import TbpwError

console = Console(stderr=True)


def user_errors(fn):
    """Turn a TbpwError into `error: <one line>` on stderr (plus any log tail) and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TbpwError as exc:
            click.echo(f"error: {exc}", err=True)
            if exc.details:
                click.echo(exc.details, err=True)
            sys.exit(2)

    return wrapper
