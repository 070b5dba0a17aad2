"""The benchmarks of fused_margin (not part of the installed package).

Run from the repository's root, as modules (``python -m bench.bench_loss``) or as files
(``python bench/bench_loss.py``: the same). ``harness`` holds what the scripts share
(memory meters, timers, machine and version description, child processes), ``cases``
the implementations ``bench_loss`` measures, ``tables`` the tables and plots of every
result (imported by the scripts and by ``report``, which builds the documentation's results).
"""
