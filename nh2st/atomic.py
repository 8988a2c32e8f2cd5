"""Whole-file writes that a reader, a crash or a Ctrl-C never sees half done."""

import os
import threading
from pathlib import Path


def atomic_write(path, write) -> Path:
    """Call write(tmp_path) on a sibling temp file (same suffix, for writers that look at it),
    then rename it onto `path`; the temp file is removed if `write` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
