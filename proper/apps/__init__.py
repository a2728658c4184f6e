"""proper.apps: the programs. The command line (``cli``: ``proper train | eval | generate |
export | data | demo | bench``), the built-in demo (``demo``) and the benchmark harness
(``bench``).

Who may import whom: the apps import the library (``proper``) and the training wing
(``proper.train``); nothing in either imports the apps (``tests/test_wings.py`` walks the
imports and checks it). The benchmark scripts in ``benchmarks/`` build on this wing.
"""
