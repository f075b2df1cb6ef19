"""Benchmarks shipped with the package: ``policyinject bench`` runs :mod:`policyinject.bench.decode`.

They need the ``bench`` extra (``pip install 'policyinject[bench]'``); a missing dependency is a
``SystemExit`` naming the extra, raised when the benchmark runs (``policyinject bench --help`` always works).

Example:
    >>> from policyinject.bench import decode
    >>> "kernels" in decode.ALL_CONFIGS
    True
"""
