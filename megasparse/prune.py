"""Moved to megasparse.tools.prune; `python -m megasparse.prune` works."""

from megasparse.tools.prune import *  # noqa: F401,F403
from megasparse.tools.prune import main

if __name__ == "__main__":
    main()
