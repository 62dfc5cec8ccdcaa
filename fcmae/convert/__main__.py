"""python -m fcmae.convert: the fcmae-convert command (fcmae.cli.convert)."""

import sys

from ..cli.convert import main

sys.exit(main())
