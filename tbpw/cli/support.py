"""What every subcommand shares: the stderr console. (User errors become one line in `tbpw.cli.TbpwGroup`.)"""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)
