"""Moved to megasparse.tools.fp8_numerics; `python -m megasparse.fp8_numerics` keeps working."""

from megasparse.tools.fp8_numerics import *  # noqa: F401,F403
from megasparse.tools.fp8_numerics import main

if __name__ == "__main__":
    main()
