"""Moved to megasparse.tools.bench; `python -m megasparse.bench` keeps working."""

from megasparse.tools.bench import *  # noqa: F401,F403
from megasparse.tools.bench import main

if __name__ == "__main__":
    main()
