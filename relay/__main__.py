"""``python -m relay``: the same as the ``ctct-relay`` command."""

import sys

from relay.cli import main

sys.exit(main())
