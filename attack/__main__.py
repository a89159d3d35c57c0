"""python -m attack list | new NAME | run NAME ARGS: the registered attacks, a skeleton for a
new one, or a run of one (see utils/scaffold.py and CONTRIBUTING.md)."""
from attack import ATTACKS, run
from utils.scaffold import main

main("attack", ATTACKS, run)
