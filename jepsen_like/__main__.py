"""`python -m jepsen_like`: the fault-injection harness (see jepsen_like/README.md)."""

import sys

from jepsen_like.harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
