"""The attack contract, checked for every registered attack (attack.contract's checks; the
rules are listed in tools/contract.py). The records the harness writes for each attack,
and their determinism, are checked in tests/test_attack.py. tests/test_contributing.py
breaks each rule on purpose."""

from __future__ import annotations

import sys

import pytest

import attack
from attack.contract import CONTRACT

NAMES = attack.list_attacks()
STATIC = CONTRACT.static_checks()


@pytest.mark.parametrize("rule", STATIC)
@pytest.mark.parametrize("name", NAMES)
def test_static_rules(name, rule):
    """registered, documented, year-and-kind, hyperparameters, config."""
    STATIC[rule](attack.ATTACKS.get(name))


@pytest.mark.parametrize("name", NAMES)
def test_trigger_and_hooks_use_only_what_they_are_given(name, tmp_path, monkeypatch):
    """no-record-loading, no-evaluation, no-argv, no-printing, in the attack's own code."""
    monkeypatch.setattr(sys, "argv", ["pytest", "--garbage-that-argparse-would-reject"])
    summary = CONTRACT.check_run(attack.ATTACKS.get(name), tmp_path)
    assert summary["attack"] == name and (tmp_path / name / "attack_result.pt").is_file()
