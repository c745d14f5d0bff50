"""What every subcommand shares: the stderr console, flags whose defaults and checks are an options model's, and
the check of an input file. (User errors become one line in `tbpw.cli.TbpwGroup`.)"""

from __future__ import annotations

import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel
from rich.console import Console

from tbpw.errors import TbpwError

F = TypeVar("F", bound=Callable[..., Any])

console = Console(stderr=True)


def default(model: type[BaseModel], field: str) -> Any:
    """A field's default in an options model: the flag that sets the field shows and uses it, so a command line and
    a recipe share one set of defaults (a list becomes the tuple a repeatable flag takes)."""
    value = model.model_fields[field].get_default(call_default_factory=True)
    return tuple(value) if isinstance(value, list) else value


def options_from_flags(model: type[BaseModel], command: str, *, flag_of: Mapping[str, str] | None = None,
                       **flags: Any) -> Any:
    """`model` made from a command's flags (named as the model's fields); a mistake is one line naming the flag.
    `flag_of` names the flags not spelled as their field (field -> flag: a repeatable `--probe` fills `probes`)."""
    from tbpw.options import build

    try:
        return build(model, f"tbpw {command}", flag_names=True, **flags)
    except TbpwError as exc:
        message = str(exc)
        for field, flag in (flag_of or {}).items():
            message = message.replace(f"tbpw {command}: --{field.replace('_', '-')}: ", f"tbpw {command}: {flag}: ", 1)
        raise TbpwError(message) from None


def _command_name(ctx: click.Context) -> str:
    names = []
    while ctx.parent is not None:  # the root's name is the program's, which `options_from_flags` adds
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(reversed(names))


def _checked_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    from tbpw.measure.options import MeasureOptions

    if value is not None:  # the recipe's `measure.threads` field, so that both refuse 0 in the same words
        options_from_flags(MeasureOptions, _command_name(ctx), threads=value)
    return value


def threads_option(help: str | None = None) -> Callable[[F], F]:
    """`--threads/-t N` of every command that runs tools or workers: at least 1, checked as a recipe's
    `measure.threads` is (with its message, as one `error:` line)."""
    return click.option("--threads", "-t", type=int, default=None, callback=_checked_threads, help=help)


def existing_file(path: str | Path, what: str) -> Path:
    """`path` when it is a regular file; else one line saying what is there instead: nothing, a folder, a device."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise TbpwError(f"{what} {path} does not exist: check the path") from None
    except OSError as exc:
        raise TbpwError(f"{what} {path} cannot be read ({exc.strerror}): check the path and its permissions") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise TbpwError(f"{what} {path} is a folder: give a file")
    kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a special file")
    raise TbpwError(f"{what} {path} is {kind}, not a regular file: give a file")
