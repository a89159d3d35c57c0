"""Attacks: ``run(name)`` trains a backdoored model and writes its record.

    from attack import run, list_attacks
    summary = run("badnet", dataset="digits", save_folder_name="badnet_digits")
"""
from attack.base import ATTACKS, Attack, AttackContext, create_attack, list_attacks, register_attack, run
from utils.registry import import_package_modules

import_package_modules("attack", skip=("base",))

__all__ = ["ATTACKS", "Attack", "AttackContext", "create_attack", "list_attacks", "register_attack", "run"]
