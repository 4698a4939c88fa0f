"""Where report tables are printed: the terminal's width, or 120 columns in a log."""

import os
import sys

from rich.console import Console


def report_console() -> Console:
    """The terminal's width (or $COLUMNS); 120 columns in a log, where Rich's 80 cuts site names."""
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    return Console() if wide else Console(width=120)
