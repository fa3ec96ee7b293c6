"""Tools around the library: the demo, the GPU benchmark, the projection and the reports.

Run as `python -m megasparse.tools.NAME`.
"""
