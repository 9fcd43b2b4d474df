"""`python -m gpt2 ...` (and the `minigrad-gpt2` script): see gpt2/cli/main.py."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
