"""`python -m kvsvr`: the `kvsvr` command (see kvsvr.cli)."""

from kvsvr.cli import main

raise SystemExit(main())
