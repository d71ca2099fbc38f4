"""`python -m arr` and `accelerate launch -m arr train ...`."""

import sys

from .cli import main

sys.exit(main())
