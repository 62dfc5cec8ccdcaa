"""python -m fcmae.convert: the fcmae-convert CLI."""

import sys

from .cli import main

sys.exit(main())
