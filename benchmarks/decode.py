"""Decode benchmark: a thin wrapper over :mod:`policyinject.bench.decode` (also ``policyinject bench``).

Run:  python benchmarks/decode.py --preset llama-3.2-1b llama-3-8b --json decode.json --plot decode.png
"""

import sys

from policyinject.bench.decode import *  # noqa: F401,F403  (the script's names, for tools that import it)
from policyinject.bench.decode import main

if __name__ == "__main__":
    sys.exit(main())
