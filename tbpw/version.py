"""tbpw's version: a leaf module, so that any floor of the package can record it without importing the facade."""

__version__ = "0.1.0"
