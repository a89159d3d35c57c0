"""``python defense/compare.py ...``: the comparison under the name the README and users know;
the same command as ``python -m bench ...`` (bench/compare.py). A script entry point, not a
defense: the registry's discovery skips it, and it is the one module of defense/ that
imports bench/."""

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

from bench.compare import main, run  # noqa: F401  (defense.compare.run: the comparison's Python API, as before)

if __name__ == "__main__":
    main()
