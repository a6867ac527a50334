"""`python -m launcher ...` (also `torchrun -m launcher ...`) = `magcache-launch ...`."""
import sys

from launcher.cli import main

sys.exit(main())
