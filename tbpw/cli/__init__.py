"""The `tbpw` command line.

Every subcommand, tbpw's own included, comes from a `tbpw_register_commands` hook: tbpw's are internal
plugins (one module per command in this package), a third party's come through entry points. The group
asks the plugin manager for them only when it needs a command, so `import tbpw.cli` loads no plugin.
A `TbpwError` from any command, a plugin's too, becomes one line on stderr (one per problem when it
holds several) and exit status 2, here and only here. Ctrl-C and SIGTERM end a command with 130 and
143 after saying what was kept; an OSError nothing handled still names its file on one line. Every command
shows the llama.cpp tools' progress on stderr (tbpw.llamacpp.progress).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from tbpw.errors import Interrupted, TbpwError, interrupt_exit_status, os_error, sigterm_as_interrupt
from tbpw.version import __version__

EXIT_USER_ERROR = 2

T = TypeVar("T")


class TbpwGroup(click.Group):
    """A click group whose commands come from the plugin manager and whose user errors are one line."""

    def _plugin_commands(self) -> dict[str, click.Command]:
        from tbpw.plugin.manager import get_manager

        return get_manager().commands()

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self._guarded(ctx, self._plugin_commands)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self.commands.get(cmd_name) or self._guarded(ctx, self._plugin_commands).get(cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        from tbpw.cli.support import console
        from tbpw.llamacpp import progress

        try:
            # every command shows the progress of the llama.cpp tools it runs, on stderr
            with sigterm_as_interrupt(), progress.showing(progress.for_console(console)):
                return super().invoke(ctx)
        except TbpwError as exc:
            fail(exc)
        except KeyboardInterrupt as exc:
            click.echo("interrupted: no output was left half-written; run the same command again to resume "
                       "(finished work is reused)", err=True)
            raise SystemExit(interrupt_exit_status(exc)) from None
        except OSError as exc:  # the last resort: every known case is handled where it happens
            fail(os_error(exc, "use"))

    @staticmethod
    def _guarded(ctx: click.Context, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except TbpwError as exc:  # a broken plugin: say which, before any command runs
            fail(exc)


def fail(exc: TbpwError) -> NoReturn:
    """Print a user error as `error: <one line>` per problem (plus any log tail) and exit with status 2;
    an interruption as what was kept, with status 130 (Ctrl-C) or 143 (SIGTERM)."""
    if isinstance(exc, Interrupted):
        click.echo(str(exc), err=True)
        raise SystemExit(interrupt_exit_status(exc))
    for problem in exc.problems:
        click.echo(f"error: {problem}", err=True)
    if exc.details:
        click.echo(exc.details, err=True)
    raise SystemExit(EXIT_USER_ERROR)



@click.group(cls=TbpwGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tbpw")
def main() -> None:
    """tbpw: quantize GGUF models to an exact bits-per-weight target with the least error."""


if __name__ == "__main__":
    main()
