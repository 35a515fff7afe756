"""Each exercise check says right for the right answer and wrong for a wrong one, on real migrations, and never
raises: an unanswered exercise says so, a malformed answer says what it could not read."""

from __future__ import annotations

import pytest

from labkit.config import VMConfig
from labkit.exercises import CHECKS, Check, check, clear_cache

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def _fresh_measurements():
    clear_cache()  # the right and the wrong answer share one measurement per check (cached), not across modules
    yield
    clear_cache()


def verdicts(name: str, right, wrong, **settings) -> tuple[Check, Check]:
    return check(name, right, **settings), check(name, wrong, **settings)


@pytest.mark.parametrize("name", sorted(CHECKS))
@pytest.mark.parametrize("missing", [None, ..., "", {"cpr-transfer": ..., "normal": ...}])
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
        ("config-cpr-transfer-accepts", {"memory_backend": "tmpfs"}),
        ("cpr-error-text", 3),
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


def test_which_mode_pauses_least():
    right, wrong = verdicts("which-mode-pauses-least", "cpr-transfer", "cpr-reboot")
    assert right.ok, right.explanation
    assert not wrong.ok and "cpr-transfer" in wrong.explanation
    assert right.measured["cpr-transfer"]["status"] == "completed"


def test_main_channel_bytes_to_an_order_of_magnitude():
    right, wrong = verdicts(
        "main-channel-bytes",
        {"cpr-transfer": 600, "normal": "200M"},
        {"cpr-transfer": "256M", "normal": "256M"},
    )
    assert right.ok, right.explanation
    assert not wrong.ok and "too high" in wrong.explanation


def test_does_it_converge():
    right, wrong = verdicts("does-it-converge", False, True)
    assert right.ok, right.explanation
    assert not wrong.ok
    assert right.measured["after_cancel"]["source runstate"] == "running"
    assert check("does-it-converge", "no").ok  # words are read too


def test_config_that_cpr_transfer_accepts():
    right, wrong = verdicts(
        "config-cpr-transfer-accepts",
        VMConfig(ram="32M", memory_backend="memfd", share=True, aux_ram_share=True),
        {"ram": "32M", "memory_backend": "ram", "share": False, "aux_ram_share": True},
    )
    assert right.ok, right.explanation
    assert not wrong.ok and "Memory region ram0 is not compatible with CPR" in wrong.explanation


def test_cpr_error_text_and_blocked_block():
    text = (
        "Memory region ram0 is not compatible with CPR. share=on is required for memory-backend objects, "
        "and aux-ram-share=on is required."
    )
    right, wrong = verdicts("cpr-error-text", text, "share=on is required")
    assert right.ok and right.expected == text
    assert not wrong.ok and "`ram0`" in wrong.explanation
    right, wrong = verdicts("blocked-block", "/rom@etc/acpi/rsdp", "ram0")
    assert right.ok, right.explanation
    assert not wrong.ok


def test_ram0_inode():
    right, wrong = verdicts(
        "ram0-inode",
        {"cpr-transfer": "same", "normal": "different"},
        {"cpr-transfer": "different", "normal": "different"},
    )
    assert right.ok, right.explanation
    assert not wrong.ok
    assert right.measured["cpr-transfer"]["same"] and not right.measured["normal"]["same"]


def test_check_renders_as_markdown():
    c = Check("x", True, True, "because")
    assert c._repr_markdown_().startswith("**✅ Right**") and bool(c)
    assert "Not quite" in Check("x", False, True, "no")._repr_markdown_()


def test_cpr_exec_pause():
    right, wrong = verdicts(
        "cpr-exec-pause", {"pid": "same", "bigger": "start-up"}, {"pid": "different", "bigger": "the rest"}
    )
    assert right.ok, right.explanation
    assert not wrong.ok and "start-up" in wrong.explanation
    assert right.measured["pids"]["source"] == right.measured["pids"]["destination"]
    other_seed = check("cpr-exec-pause", {"pid": "same", "bigger": "start-up"}, seed=2)
    assert other_seed.measured is not right.measured and other_seed.measured["verified"]
