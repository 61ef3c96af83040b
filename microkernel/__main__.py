"""``python -m microkernel`` runs the daemon (same as ``microkerneld``)."""

import sys

from microkernel.daemon import main

sys.exit(main())
