"""``python -m smartbiked``: the daemon."""

import sys

from smartbiked.service import main

sys.exit(main())
