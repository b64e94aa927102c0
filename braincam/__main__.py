"""`python -m braincam`: the same as the `braincam` console script."""

import sys

from braincam.cli import main

sys.exit(main())
