"""Defenses: ``run(name)`` purifies the model of an attack record.

    from defense import run, list_defenses
    summary = run("sau", result_file="badnet_digits", epochs=5)

Every module of this package registers its defense on import; installed distributions add
theirs through the entry-point group ``saubench.defenses`` (see utils.registry).
``python -m defense list`` shows them all; ``python -m defense new NAME`` starts a new one.
"""

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)
from defense.base import (
    DEFENSES,
    Defense,
    DefenseData,
    Detection,
    TrainingData,
    create_defense,
    list_defenses,
    main,
    register_defense,
    run,
)
from utils.registry import import_package_modules, load_plugins

PLUGIN_GROUP = "saubench.defenses"

# compare: the alias of python -m bench (bench/compare.py); contract: the contract checks; tune: the
# tuning command; training: the harness of the training-time kind. None is a defense.
import_package_modules("defense", skip=("base", "compare", "contract", "tune", "training"))
load_plugins(DEFENSES, PLUGIN_GROUP, Defense)

__all__ = [
    "DEFENSES",
    "Defense",
    "DefenseData",
    "Detection",
    "TrainingData",
    "create_defense",
    "list_defenses",
    "main",
    "register_defense",
    "run",
]
