"""python -m attack list | new NAME | run NAME ARGS | show NAME --dataset D: the registered
attacks, a skeleton for a new one, a run of one (see tools/scaffold.py and CONTRIBUTING.md),
or the YAML files and values a run on a dataset uses."""

from attack import ATTACKS, run
from attack.base import show_config
from tools.scaffold import main

main("attack", ATTACKS, run, show=show_config)
