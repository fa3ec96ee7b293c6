"""Tools around the library: the demo, the GPU benchmark and the numerics reports (`python -m megasparse.tools.NAME`)."""
