"""Moved to megasparse.tools.demo; `python -m megasparse.demo` keeps working."""

from megasparse.tools.demo import *  # noqa: F401,F403
from megasparse.tools.demo import main

if __name__ == "__main__":
    main()
