"""``python -m policyinject.cli``: the same as the ``policyinject`` console script."""

import sys

from . import main

sys.exit(main())
