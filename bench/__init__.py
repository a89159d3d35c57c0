"""The comparison: many attack and defense runs on an executor, and their tables, plots
and HTML page (``python -m bench --grid config/grid/digits_smoke.yaml``; ``python
defense/compare.py`` is the same command). It sits above attack/ and defense/ and is the
only package that imports both."""
