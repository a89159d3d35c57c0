"""python -m bench --grid FILE | --result_file RECORD ...: the comparison (bench/compare.py)."""

from bench.compare import main

main()
