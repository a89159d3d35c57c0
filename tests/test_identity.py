"""Record identity and integrity (issue 17, cases 3 to 5): a record's identity names it in
attack_summary.json and in every defense summary.json; a defense never writes a result
into a record that was replaced while it ran, and the attack's --overwrite waits for
the defenses writing into the record; the comparison reuses only results (and "no
defense" numbers) made on the record in place; records whose parts make no sense are
refused by both readers; the digests cover every tensor a defense or the comparison
reads, and records written before that still load."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch

import attack
import defense
from bench import compare
from utils.errors import UserError
from utils.records import DIGEST_PARTS, MAX_CLASSES, NEW_DIGESTS, RECORD_FILE, AttackRecord, load_record, record_digests
from utils.poison import PoisonedSet

from test_records import tiny_record as shared_tiny_record

NAME = "badnet_digits"


def tiny_record() -> AttackRecord:
    """test_records' tiny record, with a bd_train of its own (not bd_test's object)."""
    record = shared_tiny_record()
    s = record.bd_test
    record.bd_train = PoisonedSet(s.images.clone(), s.labels.clone(), s.original_labels.clone(), s.indices.clone())
    return record


def resave(folder: Path, change) -> AttackRecord:
    """The record in ``folder``, changed by ``change(record)`` and written again (valid
    digests: another version of the record, as an attack run would write it)."""
    record = load_record(folder)
    change(record)
    record.save(folder)
    return record


def other_weights(record: AttackRecord) -> None:
    record.model = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in record.model.items()}


def lock_of_a_live_run(record_folder: Path, name: str = "sau") -> Path:
    """A defense's StagedFolder lock in the record, held by a live process (our parent)."""
    lock = record_folder / "defense" / f".{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")
    return lock


# -- 3: identity, a result only on the record it was computed on ---------------------------------------------


def test_summaries_name_the_identity_of_their_record(record_root):
    folder = record_root / NAME
    identity = load_record(folder).identity
    assert len(identity) == 64
    assert json.loads((folder / "attack_summary.json").read_text())["record_identity"] == identity
    summary = defense.run("sau", result_file=NAME, record_root=str(record_root), device="cpu", epochs=0)
    assert summary["record_identity"] == identity
    assert json.loads((folder / "defense" / "sau" / "summary.json").read_text())["record_identity"] == identity


def test_identity_follows_content_not_the_file(tmp_path):
    record = tiny_record()
    record.save(tmp_path / "a")
    record.save(tmp_path / "b")
    assert load_record(tmp_path / "a").identity == load_record(tmp_path / "b").identity == record.compute_identity()
    record.attack_params = {"patch_size": 2}
    record.save(tmp_path / "b")
    assert load_record(tmp_path / "b").identity != load_record(tmp_path / "a").identity


def test_a_defense_does_not_write_into_a_record_replaced_while_it_ran(record_root, monkeypatch):
    import defense.base as harness

    real = harness._defend

    def replaced_meanwhile(defense_, record, *args, **kw):
        summary = real(defense_, record, *args, **kw)
        resave(record.path, other_weights)  # attack --overwrite, finishing while the defense runs
        return summary

    monkeypatch.setattr(harness, "_defend", replaced_meanwhile)
    with pytest.raises(UserError, match="the attack record was replaced while this run used it.*not written"):
        defense.run("sau", result_file=NAME, record_root=str(record_root), device="cpu", epochs=0)
    assert not (record_root / NAME / "defense").exists()  # nothing half-written, no lock left


def test_a_defense_still_writes_when_the_record_was_only_rewritten_the_same(record_root, monkeypatch):
    import defense.base as harness

    real = harness._defend

    def rewritten(defense_, record, *args, **kw):
        summary = real(defense_, record, *args, **kw)
        resave(record.path, lambda r: None)  # a new file, the same content
        return summary

    monkeypatch.setattr(harness, "_defend", rewritten)
    defense.run("sau", result_file=NAME, record_root=str(record_root), device="cpu", epochs=0)
    assert (record_root / NAME / "defense" / "sau" / "summary.json").is_file()


def test_attack_overwrite_refuses_while_a_defense_writes_into_the_record(record_root):
    lock = lock_of_a_live_run(record_root / NAME)
    before = (record_root / NAME / RECORD_FILE).read_bytes()
    busy = r"badnet_digits is in use by a defense run \(process \d+, lock .*\.sau\.lock\)"
    with pytest.raises(UserError, match=busy):
        attack.run(
            "badnet",
            dataset="digits",
            save_folder_name=NAME,
            record_root=str(record_root),
            epochs=1,
            device="cpu",
            overwrite=True,
        )
    assert (record_root / NAME / RECORD_FILE).read_bytes() == before
    lock.write_text(f"999999999 {socket.gethostname()}\n")  # that run is gone: a dead lock does not stop it
    attack.run(
        "badnet",
        dataset="digits",
        save_folder_name=NAME,
        record_root=str(record_root),
        epochs=1,
        device="cpu",
        overwrite=True,
    )
    assert (record_root / NAME / RECORD_FILE).read_bytes() != before


def test_the_refusal_is_one_line_and_exit_status_2_on_the_command_line(monkeypatch, capsys, record_root):
    from test_reliability import badnet_args, refused

    lock_of_a_live_run(record_root / NAME, "ft")
    line = refused(
        monkeypatch,
        capsys,
        record_root,
        "attack/badnet.py",
        *badnet_args(record_root, "--save_folder_name", NAME, "--overwrite"),
    )
    assert "badnet_digits is in use by a defense run" in line and ".ft.lock" in line


def _report(root: Path, **kw):
    return compare.run(
        result_file=[NAME],
        record_root=str(root),
        device="cpu",
        defenses=["sau"],
        option=["epochs=0"],
        plots=False,
        quiet=True,
        table_only=True,
        **kw,
    )


def test_compare_reuses_only_results_made_on_the_record_in_place(record_root):
    defense.run("sau", result_file=NAME, record_root=str(record_root), device="cpu", epochs=0)
    runs = {r["side"]: r for r in _report(record_root)["runs"]}
    assert runs["attack"]["status"] == "reused" and runs["defense"]["status"] == "reused"

    resave(record_root / NAME, other_weights)  # another version of the record, same name
    result = _report(record_root)
    runs = {r["side"]: r for r in result["runs"]}
    assert runs["defense"]["status"] == "mismatch"
    assert "stale: made on another version of the record" in runs["defense"]["message"]
    assert runs["attack"]["status"] == "mismatch"  # its attack_summary.json is the old record's too
    assert "attack_summary.json is stale: made on another version of the record" in runs["attack"]["message"]
    rows = {r["defense"]: r for r in result["rows"]}
    assert rows["sau"]["n"] == 0 and rows["no defense"]["n"] == 0
    assert "| sau | mismatch: stale: made on another version of the record" in result["markdown"]


def test_compare_does_not_reuse_a_result_that_names_no_identity(record_root):
    defense.run("sau", result_file=NAME, record_root=str(record_root), device="cpu", epochs=0)
    path = record_root / NAME / "defense" / "sau" / "summary.json"
    summary = json.loads(path.read_text())
    del summary["record_identity"]
    path.write_text(json.dumps(summary))
    run = next(r for r in _report(record_root)["runs"] if r["side"] == "defense")
    assert run["status"] == "mismatch" and "names no record identity" in run["message"]


def _strip(path: Path) -> None:
    data = json.loads(path.read_text())
    del data["record_identity"]
    path.write_text(json.dumps(data))


def test_results_made_before_identities_beside_a_record_as_old_are_still_reused(record_root):
    """A record and its results written before this change (main's grids) keep working."""
    folder = record_root / NAME
    defense.run("sau", result_file=NAME, record_root=str(record_root), device="cpu", epochs=0)
    _strip(folder / "attack_summary.json")
    _strip(folder / "defense" / "sau" / "summary.json")
    raw = torch.load(folder / RECORD_FILE, weights_only=True)
    raw["sha256"] = {k: raw["sha256"][k] for k in ("model", "bd_test")}
    torch.save(raw, folder / RECORD_FILE)
    result = _report(record_root)
    assert {r["side"]: r["status"] for r in result["runs"]} == {"attack": "reused", "defense": "reused"}
    assert {r["defense"]: r["n"] for r in result["rows"]} == {"no defense": 1, "sau": 1}
    path = folder / "defense" / "sau" / "summary.json"  # one that names another record is still stale
    path.write_text(json.dumps({**json.loads(path.read_text()), "record_identity": "0" * 64}))
    run = next(r for r in _report(record_root)["runs"] if r["side"] == "defense")
    assert run["status"] == "mismatch" and "stale: made on another version of the record" in run["message"]


# -- 4: files that belong together; records that make no sense ----------------------------------------------------


def test_a_swapped_attack_result_is_not_reported_with_the_other_record_s_numbers(record_root, tmp_path):
    other = tmp_path / "other"
    record = load_record(record_root / NAME)
    other_weights(record)
    record.save(other)
    (record_root / NAME / RECORD_FILE).write_bytes((other / RECORD_FILE).read_bytes())
    result = _report(record_root)
    base = next(r for r in result["runs"] if r["side"] == "attack")
    assert base["status"] == "mismatch" and "attack_summary.json is stale" in base["message"]
    row = next(r for r in result["rows"] if r["defense"] == "no defense")
    assert row["n"] == 0 and row["c_acc"] is None


def test_a_record_with_an_empty_backdoor_test_set_is_refused_before_any_work(record_root):
    def empty(record):
        e = torch.zeros(0, dtype=torch.long)
        record.bd_test = PoisonedSet(record.bd_test.images[:0].clone(), e, e, e)

    resave(record_root / NAME, empty)
    with pytest.raises(UserError, match=r"backdoor test set \(bd_test\) is empty"):
        defense.run("sau", result_file=NAME, record_root=str(record_root), device="cpu", epochs=0)
    assert not (record_root / NAME / "defense").exists()


def _labels(part: str, name: str, value: int):
    def change(record):
        s = getattr(record, part)
        t = getattr(s, name).clone()
        t[0] = value
        setattr(s, name, t)

    return change


def _cross(record):
    record.cross_test = PoisonedSet(
        record.bd_test.images.clone(), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 1]), torch.arange(4)
    )


BAD = {
    "bd_test.labels": (_labels("bd_test", "labels", 3), r"'bd_test.labels' holds 3, outside 0..2"),
    "bd_test.original_labels": (_labels("bd_test", "original_labels", -1), r"'bd_test.original_labels' holds -1"),
    "bd_train.labels": (_labels("bd_train", "labels", 7), r"'bd_train.labels' holds 7"),
    "bd_train.original_labels": (_labels("bd_train", "original_labels", 3), r"'bd_train.original_labels' holds 3"),
    "cross_test.labels": (_cross, r"'cross_test.labels' holds 3, outside 0..2"),
    "num_classes huge": (
        lambda r: setattr(r, "num_classes", 10**12),
        rf"'num_classes' must be an integer in "
        rf"1..{MAX_CLASSES}, not 1000000000000",
    ),
    "num_classes vs model": (
        lambda r: setattr(r, "num_classes", 5),
        r"'num_classes' is 5 but the model's output "
        r"layer \(net.linear.weight\) has 3 outputs",
    ),
    "mean length": (
        lambda r: setattr(r, "mean", (0.5, 0.5, 0.5)),
        r"'normalization.mean' must have one entry per "
        r"channel \(1\), not 3",
    ),
    "std nan": (lambda r: setattr(r, "std", (float("nan"),)), r"'normalization.std' must be finite"),
    "std zero": (lambda r: setattr(r, "std", (0.0,)), r"'normalization.std' must be > 0"),
    "poison indices": (
        lambda r: setattr(r, "poison_indices", torch.tensor([0, 3])),
        r"'poison_indices' leaves out poisoned training samples of bd_train \(e.g. 5\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_records_that_make_no_sense_are_refused_naming_the_field(tmp_path, case):
    change, message = BAD[case]
    record = tiny_record()
    change(record)
    record.save(tmp_path)  # written with matching digests: only the sense checks can refuse it
    with pytest.raises(UserError, match=r"attack_result.pt: malformed attack record \(" + message):
        load_record(tmp_path)


def test_a_backdoorbench_record_goes_through_the_same_checks(digits_record_root, tmp_path):
    from test_backdoorbench import write_bb_record

    source = load_record(digits_record_root / NAME)
    source.bd_test.labels[0] = 10  # as its data_dict's other_info says
    write_bb_record(source, tmp_path / "bb", "bb")
    with pytest.raises(
        UserError,
        match=r"bb/attack_result.pt: malformed attack record \('bd_test.labels' holds 10, "
        r"outside 0..9",
    ):
        load_record(tmp_path / "bb")
    data = torch.load(tmp_path / "bb" / RECORD_FILE, weights_only=False)
    data["num_classes"] = 10**12
    torch.save(data, tmp_path / "bb" / RECORD_FILE)
    with pytest.raises(UserError, match=r"'num_classes' must be an integer in 1..100000"):
        load_record(tmp_path / "bb")


# -- 5: digests over every tensor --------------------------------------------------------------------------------


def _flip(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1).view(torch.uint8)[0] ^= 1
    return t


def _edit(raw: dict, where: tuple[str, ...], fn) -> None:
    target = raw
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = fn(target[where[-1]])


CHANGES = {
    ("poison_indices",): ("the poison indices", _flip),
    ("poison_indices", "empty"): ("the poison indices", lambda t: t[:0]),
    ("bd_train", "images"): (r"the poisoned training set \(bd_train\)", _flip),
    ("bd_train", "labels"): (r"the poisoned training set \(bd_train\)", _flip),
    ("bd_train", "original_labels"): (r"the poisoned training set \(bd_train\)", _flip),
    ("cross_test", "images"): (r"the cross test set \(cross_test\)", _flip),
    ("extras", "pattern"): (r"the attack's extra tensors \(extras\)", _flip),
    ("config", "epochs"): (r"the record's fields", lambda v: v + 1),
    ("attack_params", "patch_size"): (r"the record's fields", lambda v: v + 1),
}


@pytest.mark.parametrize("where", sorted(CHANGES), ids="-".join)
def test_a_changed_byte_in_any_tensor_or_field_is_detected(tmp_path, where):
    record = tiny_record()
    _cross(record)
    record.cross_test.labels[:] = 1
    record.save(tmp_path)
    raw = torch.load(tmp_path / RECORD_FILE, weights_only=True)
    what, fn = CHANGES[where]
    _edit(raw, where[:1] if where[-1] == "empty" else where, fn)
    torch.save(raw, tmp_path / RECORD_FILE)
    with pytest.raises(UserError, match=f"attack_result.pt: {what}.* not match (its|their) SHA-256"):
        load_record(tmp_path)


def test_a_record_written_now_has_every_digest(tmp_path):
    tiny_record().save(tmp_path)
    raw = torch.load(tmp_path / RECORD_FILE, weights_only=True)
    assert set(raw["sha256"]) == set(DIGEST_PARTS) and raw["sha256"]["cross_test"] == "none"


def test_records_written_before_the_full_digests_still_load(tmp_path, caplog):
    record = tiny_record()
    record.save(tmp_path)
    raw = torch.load(tmp_path / RECORD_FILE, weights_only=True)
    raw["sha256"] = {k: raw["sha256"][k] for k in ("model", "bd_test")}
    torch.save(raw, tmp_path / RECORD_FILE)
    with caplog.at_level(logging.WARNING, logger="saubench"):
        loaded = load_record(tmp_path)
    assert loaded.identity == record.compute_identity() and loaded.sha256 == record_digests(record)
    assert any("written before records carried digests of every tensor" in r.getMessage() for r in caplog.records)

    raw["model"]["net.linear.bias"] += 1  # the digests it has still count
    torch.save(raw, tmp_path / RECORD_FILE)
    with pytest.raises(UserError, match="model weights do not match their SHA-256"):
        load_record(tmp_path)


@pytest.mark.parametrize("missing", NEW_DIGESTS)
def test_a_record_with_some_new_digests_but_not_all_is_refused(tmp_path, missing):
    tiny_record().save(tmp_path)
    raw = torch.load(tmp_path / RECORD_FILE, weights_only=True)
    del raw["sha256"][missing]
    torch.save(raw, tmp_path / RECORD_FILE)
    with pytest.raises(UserError, match=rf"'sha256' lacks the digests of {missing}"):
        load_record(tmp_path)
