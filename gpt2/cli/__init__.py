"""The command line, `python -m gpt2 ...`: one module per command over the library in gpt2/.

Imports go one way: gpt2/cli/ uses the library; nothing in the library imports gpt2/cli/.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
