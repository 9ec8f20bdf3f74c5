"""`python -m q3vl` = the `q3vl` command."""

import sys

from q3vl.cli import main

sys.exit(main())
