"""``python -m dataprep``: the ``dataprep`` command."""
import sys

from .cli import main

sys.exit(main())
