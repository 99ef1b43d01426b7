"""jaxprune's benchmarks: ``python -m benchmarks`` regenerates BENCHMARKS.md.

Each ``bench_*.py`` module also runs alone (``python benchmarks/bench_x.py``)
and exposes ``run(quick=False, ...) -> str``, its Markdown section.
"""
