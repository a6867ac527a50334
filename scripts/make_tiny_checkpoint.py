#!/usr/bin/env python
"""Write a tiny random Wan2.2 checkpoint (official or diffusers layout) that every code path can load on CPU.

    python scripts/make_tiny_checkpoint.py --task t2v-A14B --layout official --out /tmp/tiny [--seed 0]
    python scripts/make_tiny_checkpoint.py --task ti2v-5B --layout official --out /tmp/bench --preset bench

The command line only; the code is `launcher.checkpoint.tiny` (import `make_tiny_checkpoint` from there).
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from launcher.checkpoint.tiny import make_tiny_checkpoint, main  # noqa: E402,F401 - scripts loading this file by path use it

if __name__ == "__main__":
    sys.exit(main())
