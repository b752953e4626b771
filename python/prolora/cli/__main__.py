"""`python -m prolora.cli`: the `prolora` command."""
import sys

from . import main

sys.exit(main())
