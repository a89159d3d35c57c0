"""Attacks: ``run(name)`` trains a backdoored model and writes its record.

    from attack import run, list_attacks
    summary = run("badnet", dataset="digits", save_folder_name="badnet_digits")

Every module of this package registers its attack on import; installed distributions add
theirs through the entry-point group ``saubench.attacks`` (see utils.registry).
``python -m attack list`` shows them all; ``python -m attack new NAME`` starts a new one.
"""

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)
from attack.base import ATTACKS, Attack, AttackContext, create_attack, list_attacks, main, register_attack, run
from utils.registry import import_package_modules, load_plugins

PLUGIN_GROUP = "saubench.attacks"

import_package_modules("attack", skip=("base", "contract"))  # contract: the contract checks, no attack
load_plugins(ATTACKS, PLUGIN_GROUP, Attack)

__all__ = ["ATTACKS", "Attack", "AttackContext", "create_attack", "list_attacks", "main", "register_attack", "run"]
