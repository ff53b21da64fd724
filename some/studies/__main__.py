"""The child processes of a study (``python -m some.studies _run|_dense SPEC.json``, started
by ``some ablate``): a module of its own, so that running it does not import
:mod:`some.studies.runner` twice (``python -m some.studies.runner`` would, with a warning)."""
import sys

from .runner import main

sys.exit(main())
