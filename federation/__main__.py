"""``python -m federation ...`` is ``dwcp ...``."""

import sys

from federation.cli import main

sys.exit(main())
