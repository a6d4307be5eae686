"""``python -m api.cli``: the same as ``envctl``."""

import sys

from api.cli import main

sys.exit(main())
