"""``python -m federation ...`` is ``dwcp ...``."""

import sys

from federation.cli.main import main

sys.exit(main())
