"""Built-in metrics, registered through the `tbpw` entry-point group like any third-party plugin."""
