"""python -m defense list | new NAME | run NAME ARGS: the registered defenses, a skeleton for a
new one, or a run of one (see utils/scaffold.py and CONTRIBUTING.md)."""
from defense import DEFENSES, run
from utils.scaffold import main

main("defense", DEFENSES, run)
