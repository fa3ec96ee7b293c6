"""Moved to megasparse.tools.kernel_report; `python -m megasparse.kernel_report` keeps working."""

from megasparse.tools.kernel_report import *  # noqa: F401,F403
from megasparse.tools.kernel_report import main

if __name__ == "__main__":
    raise SystemExit(main())
