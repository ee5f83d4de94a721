"""``python -m callsock``: the same as the ``callsock`` command."""

import sys

from .cli.main import main

sys.exit(main())
