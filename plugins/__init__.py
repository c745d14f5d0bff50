"""tbpw's built-in plugins: each module is one entry point in the `tbpw` group."""
