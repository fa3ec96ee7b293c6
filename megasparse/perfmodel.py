"""Moved to megasparse.tools.perfmodel; `python -m megasparse.perfmodel` works too."""

from megasparse.tools.perfmodel import *  # noqa: F401,F403
from megasparse.tools.perfmodel import main

if __name__ == "__main__":
    main()
