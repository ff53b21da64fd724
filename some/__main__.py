"""``python -m some ...`` is the ``some`` command."""
import sys

from .cli import main

sys.exit(main())
