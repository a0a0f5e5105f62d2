"""A state store this process cannot write, as a root-owned file or a read-only mount is."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest


def make_read_only(monkeypatch: pytest.MonkeyPatch, db: Path) -> None:
    """``db`` read-only to this process from now on: its mode 0444, and where the tests run as
    root (whom file modes do not stop), every connection SQLite opens read-only, which is what
    SQLite does by itself with a file it may not write."""
    db.chmod(0o444)
    if os.geteuid() == 0:
        connect = sqlite3.connect

        def read_only(path, *args, **kwargs):
            return connect(f"file:{path}?mode=ro", *args, uri=True, **kwargs)

        monkeypatch.setattr(sqlite3, "connect", read_only)
