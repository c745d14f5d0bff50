"""Everything that touches llama.cpp: source pins, the CMake build, tool runners, parsers, the libggml bridge.

No other part of tbpw runs a llama.cpp binary or loads a llama.cpp library directly.
"""
