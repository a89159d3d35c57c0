"""defense/clp.py. tests/test_defense_contract.py already holds clp to the contract
(it is registered); this file tests what the method itself does."""
from __future__ import annotations

from defense import DEFENSES, create_defense
from utils.datasets import load_dataset
from utils.metrics import evaluate


def test_clp_does_not_raise_the_attack_success_rate(digits_defender):
    record, data = digits_defender  # the session's BadNets record on digits, and a defender's clean subset
    test = load_dataset("digits").test
    model = record.build_model().eval()
    before = evaluate(model, test, record.bd_test, device=data.device)
    defense = create_defense("clp", **DEFENSES.get("clp").smoke_params)
    after = evaluate(defense.mitigate(model, data), test, record.bd_test, device=data.device)
    # <Say what the method achieves on this record (ASR about 0.95 before), e.g.
    #  assert after.asr < 0.5 and after.clean_acc > before.clean_acc - 0.05>
    assert after.asr <= before.asr
