"""bench/serve_memory.py: the process tree's memory is the proxy's and its children's."""
from __future__ import annotations

import os
import subprocess
import sys

from support import bench_module


def test_the_tree_s_memory_counts_the_children_too():
    tree_rss_mb = bench_module.load("serve_memory").tree_rss_mb
    own = tree_rss_mb(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        deadline = 50
        while tree_rss_mb(child.pid) < 60 and deadline:
            subprocess.run(["sleep", "0.1"])
            deadline -= 1
        assert tree_rss_mb(child.pid) >= 60  # the child's 64 MiB
        assert tree_rss_mb(os.getpid()) >= own + 60
    finally:
        child.kill()
        child.wait()
