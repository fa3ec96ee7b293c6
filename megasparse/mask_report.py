"""Moved to megasparse.tools.mask_report; `python -m megasparse.mask_report` keeps working."""

from megasparse.tools.mask_report import *  # noqa: F401,F403
from megasparse.tools.mask_report import main

if __name__ == "__main__":
    main()
