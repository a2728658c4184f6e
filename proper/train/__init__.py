"""proper.train: the training wing. Data files, the user index and splits (``data``), the
synthetic task and LaMP's files (``synthetic``, ``lamp``), the resumable trainer, the three
PROPER stages and their grouping (``trainer``, ``stages``, ``grouping``), the user-sharded
bank under torchrun (``distributed``), the metrics and the plots.

Who may import whom: this wing imports the library (``proper``: config, layer, patching,
io, export, optim) and never the apps; ``proper.apps`` imports it; the library never does
(``tests/test_wings.py`` walks the imports and checks it).
"""
