"""tbpw: quantize GGUF models to an exact bits-per-weight target with the least error."""

__version__ = "0.1.0"
