"""Built-in allocators, registered through the `tbpw` entry-point group like any third-party plugin."""
