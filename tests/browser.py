"""``python -m tests.browser``: the Makefile's ``screenshot`` entry point, kept where it looks for it.

The driver itself is tests/support/browser.py (``python -m tests.support.browser`` does the same).
"""

import asyncio
import sys

from tests.support.browser import _main

if __name__ == "__main__":
    sys.exit(asyncio.run(_main()))
