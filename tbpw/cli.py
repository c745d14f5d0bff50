"""The `tbpw` command line. Subcommands are thin: they parse arguments and call the library.

Built-in subcommands live one per module in `tbpw/commands/`; plugins add theirs through the
`tbpw_register_commands` hook.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from . import __version__, commands
from .errors import TbpwError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tbpw")
def main() -> None:
    """tbpw: quantize GGUF models to an exact bits-per-weight target with the least error."""


for _module in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
    importlib.import_module(f"{commands.__name__}.{_module}").register(main)


def _add_plugin_commands() -> None:
    from .plugins import get_manager

    try:
        get_manager().pm.hook.tbpw_register_commands(cli=main)
    except TbpwError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


_add_plugin_commands()

if __name__ == "__main__":
    main()
