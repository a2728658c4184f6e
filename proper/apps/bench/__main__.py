"""``python -m proper.apps.bench``: the same as ``proper bench``."""

import sys

from .main import main

sys.exit(main())
