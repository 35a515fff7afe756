"""Each exercise has seeded variants, and its check says right for a right answer, wrong for a wrong one and
"not answered yet" for the notebook's template, on real migrations of that variant; it never raises.

The right answers here are worked out by the method the solution notebooks teach (from the variant's
parameters, never from the check's own measurement), so a check that measured wrongly fails these tests.
"""

from __future__ import annotations

import pytest

from labkit.host.hardware import VMConfig
from labkit.host.runners import qemu_guest as qg
from labkit.teach.exercises import (
    CHECKS,
    EXERCISES,
    Check,
    check,
    clear_cache,
    converge_model,
    my_seed,
    variant,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", autouse=True)
def _fresh_measurements():
    clear_cache()  # the right and the wrong answer share one measurement per check (cached), not across modules
    yield
    clear_cache()


def right_answer(exercise: str, v: dict):
    """The answer the solution notebook's method gives for variant v."""
    if exercise == "which-mode-pauses-least":
        return "cpr-transfer"  # the only mode whose pause holds no RAM and no process start
    if exercise == "main-channel-bytes":
        return {"cpr-transfer": "1K", "normal": v["ram"]}  # device state only; every page at least once
    if exercise == "does-it-converge":
        return converge_model(v["ram"], v["dirty_rate"], v["max_bandwidth"], v["downtime_limit"])["converges"]
    if exercise == "config-cpr-transfer-accepts":
        return {"share": True, "aux_ram_share": True}
    if exercise == "cpr-error-text":
        if not v["share"]:
            return {"block": "ram0", "option": "share=on"}
        return {"block": "pc.bios", "option": "aux-ram-share"}
    if exercise == "blocked-block":
        return "pc.bios"
    if exercise == "ram0-inode":
        return {"cpr-transfer": "same", "normal": "different"}
    if exercise == "cpr-exec-pause":
        return {"pid": "same", "bigger": "start-up"}
    raise AssertionError(exercise)


def wrong_answer(exercise: str, v: dict):
    if exercise == "which-mode-pauses-least":
        return "cpr-reboot"
    if exercise == "main-channel-bytes":
        return {"cpr-transfer": v["ram"], "normal": v["ram"]}
    if exercise == "does-it-converge":
        return not right_answer(exercise, v)
    if exercise == "config-cpr-transfer-accepts":
        return {"share": False, "aux_ram_share": True}
    if exercise == "cpr-error-text":
        return {**right_answer(exercise, v), "option": "aux-ram-share" if not v["share"] else "share"}
    if exercise == "blocked-block":
        return "ram0"
    if exercise == "ram0-inode":
        return {"cpr-transfer": "different", "normal": "different"}
    if exercise == "cpr-exec-pause":
        return {"pid": "different", "bigger": "start-up"}
    raise AssertionError(exercise)


# The prediction cell of each exercise notebook, as stored (and half-filled versions of it).
TEMPLATES = {
    "which-mode-pauses-least": [...],
    "main-channel-bytes": [{"cpr-transfer": ..., "normal": ...}, {"cpr-transfer": "1K", "normal": ...}],
    "does-it-converge": [...],
    "config-cpr-transfer-accepts": [{"share": ..., "aux_ram_share": ...}, {"share": True, "aux_ram_share": ...}],
    "cpr-error-text": [{"block": ..., "option": ...}, {"block": "ram0", "option": ...}],
    "blocked-block": [...],
    "ram0-inode": [{"cpr-transfer": ..., "normal": ...}, {"cpr-transfer": "same", "normal": ...}],
    "cpr-exec-pause": [{"pid": ..., "bigger": ...}, {"pid": "same", "bigger": ...}],
}

# (exercise, seed): seeds chosen so that both branches of a check are covered where the variant has two
CASES = [
    ("which-mode-pauses-least", 3),
    ("main-channel-bytes", 2),
    ("does-it-converge", 1),  # r = 3: never converges
    ("does-it-converge", 2),  # r = 0.25: converges
    ("config-cpr-transfer-accepts", 2),
    ("cpr-error-text", 1),  # aux-ram-share off
    ("cpr-error-text", 3),  # the backend's share off
    ("blocked-block", 2),
    ("ram0-inode", 3),
    ("cpr-exec-pause", 2),
]


def test_every_exercise_has_variants_and_a_check():
    assert set(EXERCISES) == set(CHECKS)
    for exercise in EXERCISES:
        assert variant(exercise, 7) == variant(exercise, 7), exercise  # the same seed, the same parameters
        params = [{k: v for k, v in variant(exercise, s).items() if k != "seed"} for s in range(1, 11)]
        assert len({tuple(sorted(p.items())) for p in params}) > 1, f"{exercise}: every seed is alike"
    assert variant("does-it-converge", 1) != variant("does-it-converge", 2)


def test_the_case_table_covers_every_exercise_and_both_branches():
    assert {e for e, _ in CASES} == set(EXERCISES)
    converges = {converge_model(**{k: v for k, v in variant("does-it-converge", s).items() if k != "seed"})[
        "converges"] for e, s in CASES if e == "does-it-converge"}  # fmt: skip
    assert converges == {True, False}
    assert {variant("cpr-error-text", s)["share"] for e, s in CASES if e == "cpr-error-text"} == {True, False}


def test_variant_refuses_unknown_ids_and_bad_seeds():
    with pytest.raises(ValueError, match="known:"):
        variant("no-such-exercise")
    with pytest.raises(ValueError, match="seed"):
        variant("does-it-converge", seed=-1)
    assert 1 <= my_seed() <= 999
    c = check("does-it-converge", True, seed="mine")
    assert not c.ok and "seed must be a whole number" in c.explanation


def test_my_seed_follows_labkit_seed(monkeypatch):
    monkeypatch.setenv("LABKIT_SEED", "42")
    assert my_seed() == 42


@pytest.mark.parametrize("exercise,seed", CASES, ids=[f"{e}-seed{s}" for e, s in CASES])
def test_right_wrong_and_template(exercise, seed):
    v = variant(exercise, seed)
    right = check(exercise, right_answer(exercise, v), seed=seed)
    assert right.answered and right.ok, right.explanation
    wrong = check(exercise, wrong_answer(exercise, v), seed=seed)
    assert wrong.answered and not wrong.ok, wrong.explanation
    for template in TEMPLATES[exercise]:
        empty = check(exercise, template, seed=seed)
        assert not empty.ok and not empty.answered, (template, empty.explanation)
        assert "Not answered yet" in empty._repr_markdown_()


@pytest.mark.parametrize("name", sorted(CHECKS))
@pytest.mark.parametrize("missing", [None, ..., "", "...", {"cpr-transfer": ..., "normal": ...}])
def test_unanswered_says_not_answered_yet(name, missing):
    c = check(name, missing)
    assert not c.ok and not c.answered
    assert "Not answered yet" in c._repr_markdown_()


def test_unknown_exercise_is_a_verdict_not_an_error():
    c = check("no-such-exercise", "x")
    assert not c.ok and "known:" in c.explanation


@pytest.mark.parametrize(
    "name,bad",
    [
        ("which-mode-pauses-least", "teleport"),
        ("main-channel-bytes", "lots"),
        ("main-channel-bytes", {"cpr-transfer": "lots", "normal": "1G"}),
        ("does-it-converge", "perhaps"),
        ("config-cpr-transfer-accepts", 42),
        ("config-cpr-transfer-accepts", {"memory_backend": "tmpfs", "share": True}),
        ("config-cpr-transfer-accepts", {"share": "yes please", "aux_ram_share": True}),
        ("cpr-error-text", "Memory region ram0 is not compatible with CPR."),
        ("cpr-error-text", {"block": "ram0", "option": "turn it off and on"}),
        ("blocked-block", 3),
        ("ram0-inode", {"cpr-transfer": "maybe", "normal": "same"}),
        ("ram0-inode", "same"),
        ("cpr-exec-pause", {"pid": "maybe", "bigger": "start-up"}),
        ("cpr-exec-pause", "same"),
    ],
)
def test_malformed_answers_are_wrong_with_a_reason(name, bad):
    c = check(name, bad)
    assert c.answered and not c.ok
    assert "Could not read your answer" in c.explanation
    assert "❌" in c._repr_markdown_()


def test_any_blocked_block_is_right_not_only_the_one_migrate_quotes():
    """QEMU's `migrate` quotes the head of its blocker list; every block in blocked-reasons is as right."""
    seed = 2
    names = check("blocked-block", "pc.bios", seed=seed).expected
    assert len(names) > 1 and "pc.bios" in names
    for name in names:
        assert check("blocked-block", name, seed=seed).ok, name
    assert check("blocked-block", names[-1].removeprefix("/rom@"), seed=seed).ok  # without QEMU's prefix
    aux_off = next(s for s in range(1, 20) if not variant("cpr-error-text", s)["aux_ram_share"])
    for name in names:
        assert check("cpr-error-text", {"block": name, "option": "aux-ram-share"}, seed=aux_off).ok, name


def test_a_config_answer_as_vmconfig_and_the_variants_backend():
    seed = next(s for s in range(1, 20) if variant("config-cpr-transfer-accepts", s)["memory_backend"] == "memfd")
    assert check("config-cpr-transfer-accepts", VMConfig(ram="32M", share=True, aux_ram_share=True), seed=seed).ok
    other = check("config-cpr-transfer-accepts", {"memory_backend": "ram", "share": True}, seed=seed)
    assert not other.ok and "variant's memory backend" in other.explanation


def test_settings_override_the_variant():
    c = check("does-it-converge", False, seed=2, dirty_rate="256M", max_bandwidth="64M")
    assert c.ok and "256.0 MiB/s" in c.explanation, c.explanation


def test_check_renders_as_markdown():
    c = Check("x", True, True, "because")
    assert c._repr_markdown_().startswith("**✅ Right**") and bool(c)
    assert "Not quite" in Check("x", False, True, "no")._repr_markdown_()


needs_qemu = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        (qg.qemu_version() or (0,)) < (10, 0, 0), reason="needs qemu-system-x86_64 >= 10.0; run scripts/install-qemu"
    ),
]


@needs_qemu[0]
@needs_qemu[1]
def test_any_blocked_block_on_real_qemu():
    """Real QEMU 10 lists every private block as a blocker; each is right, and ram0 (shared here) is not."""
    seed = 2
    names = check("blocked-block", "pc.bios", seed=seed, backend="qemu").expected
    assert "pc.bios" in names and "ram0" not in names and len(names) > 1
    for name in names:
        assert check("blocked-block", name, seed=seed, backend="qemu").ok, name
    assert not check("blocked-block", "ram0", seed=seed, backend="qemu").ok


@needs_qemu[0]
@needs_qemu[1]
def test_bytes_are_judged_against_the_backend_used():
    """Real QEMU's cpr-transfer stream holds tens of KiB of device state, the emulator's a few hundred
    bytes: the same prediction is right on one backend and wrong on the other."""
    seed = 2
    ram = variant("main-channel-bytes", seed)["ram"]
    on_qemu = check("main-channel-bytes", {"cpr-transfer": "1K", "normal": ram}, seed=seed, backend="qemu")
    assert not on_qemu.ok and "real QEMU 10" in on_qemu.explanation, on_qemu.explanation
    got = on_qemu.expected["cpr-transfer"]
    assert got > 10 * 1024
    assert check("main-channel-bytes", {"cpr-transfer": got, "normal": ram}, seed=seed, backend="qemu").ok
