"""nh2st: NH²2ST spatial gene-expression prediction from H&E slides, on cached features."""

import time

__version__ = "0.1.0"
TIMESTAMP = "%Y-%m-%dT%H:%M:%S%z"     # every time nh2st writes into a file


def now() -> str:
    """The current local time in TIMESTAMP's format."""
    return time.strftime(TIMESTAMP)
