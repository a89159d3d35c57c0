"""Defenses: ``run(name)`` purifies the model of an attack record.

    from defense import run, list_defenses
    summary = run("sau", result_file="badnet_digits", epochs=5)
"""
from defense.base import (DEFENSES, Defense, DefenseData, create_defense, list_defenses, register_defense,
                          run)
from utils.registry import import_package_modules

import_package_modules("defense", skip=("base", "compare"))  # compare: the comparison command, no defense

__all__ = ["DEFENSES", "Defense", "DefenseData", "create_defense", "list_defenses", "register_defense", "run"]
