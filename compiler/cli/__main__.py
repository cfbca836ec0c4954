"""``python -m compiler.cli``: the ``fxpress`` command."""

from __future__ import annotations

import sys

from compiler.cli.main import main

sys.exit(main())
