"""python -m defense list | new NAME | run NAME ARGS | show NAME --dataset D | tune NAME ARGS:
the registered defenses, a skeleton for a new one, a run of one (see tools/scaffold.py and
CONTRIBUTING.md), the YAML file and values a run on a dataset uses, or a study that tunes
one on a validation split (see defense/tune.py)."""

import sys

from defense import DEFENSES, run
from defense.base import show_config
from tools.scaffold import main

if len(sys.argv) > 1 and sys.argv[1] == "tune":
    from defense.tune import main as tune_main

    sys.argv = [sys.argv[0], *sys.argv[2:]]
    tune_main()
else:
    main("defense", DEFENSES, run, show=show_config)
