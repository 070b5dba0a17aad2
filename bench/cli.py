"""How a benchmark script starts: ``python -m bench.X`` and ``python bench/X.py`` run the
same module.

Run as a file, a script has no package, so its relative imports (``from .harness import
...``) would fail. Its first lines hand over to :func:`run_as_module` instead::

    if not __package__:  # run as a file (python bench/X.py): run it as the module bench.X
        from cli import run_as_module  # bench/ is sys.path[0] when a file in it runs

        run_as_module(__file__)

This module imports nothing from the package, so a script run as a file can import it
as the top-level module ``cli``.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import NoReturn


def run_as_module(file: str) -> NoReturn:
    """Runs the script ``bench/<name>.py`` as the module ``bench.<name>`` (as ``__main__``,
    with ``sys.argv[0]`` its path and the same arguments), with the repository's root on
    ``sys.path`` in place of ``bench/``; exits with the script's exit status."""
    path = Path(file).resolve()
    sys.path[0] = str(path.parents[1])
    runpy.run_module(f"bench.{path.stem}", run_name="__main__", alter_sys=True)
    raise SystemExit(0)
