"""Built-in subcommands, one module each. A module here defines `register(cli: click.Group)`.

Plugins add subcommands through the `tbpw_register_commands` hook instead.
"""
