"""`python -m cli ...` (and `torchrun -m cli train ...`): the same command as the `petvit` script."""

import sys

from cli.main import main

sys.exit(main())
