"""The prediction check used by the notebooks: right, wrong and placeholder answers, for every kind."""

from __future__ import annotations

import pytest

from labkit.teach.predictions import NOT_YET, RIGHT, WRONG, check_order, check_prediction, grows, order_of


@pytest.mark.parametrize("placeholder", [..., None, "", "  ", [], [..., ...]])
def test_a_placeholder_is_not_yet_answered_and_still_reveals(placeholder):
    v = check_prediction("bytes?", placeholder, 1800)
    assert v.verdict == NOT_YET and not v.right
    assert "1800" in str(v) and "no prediction yet" in str(v)


def test_numbers_within_the_band_are_right_outside_wrong():
    assert check_prediction("ratio", 1.1, 1.0, rel=0.25).verdict == RIGHT
    assert check_prediction("ratio", 4.0, 1.0, rel=0.25).verdict == WRONG
    assert check_prediction("ms", 7, 5.0, abs_tol=2).verdict == RIGHT
    assert check_prediction("ms", 8, 5.0, abs_tol=2).verdict == WRONG


def test_strings_ignore_case_and_space():
    assert check_prediction("state", " Paused", "paused").verdict == RIGHT
    assert check_prediction("state", "running", "paused").verdict == WRONG


def test_sets_any_order_lists_in_order():
    assert check_prediction("modes", ["cpr-exec", "cpr-reboot"], {"cpr-reboot", "cpr-exec"}).verdict == RIGHT
    assert check_prediction("modes", "cpr-exec", {"cpr-exec"}).verdict == RIGHT
    assert check_prediction("modes", {"cpr-exec"}, {"cpr-reboot", "cpr-exec"}).verdict == WRONG
    assert check_prediction("order", ["a", "b", "c"], ["a", "b", "c"]).verdict == RIGHT
    assert check_prediction("order", ["b", "a", "c"], ["a", "b", "c"]).verdict == WRONG


def test_an_empty_set_is_an_answer():
    assert check_prediction("modes", set(), set()).verdict == RIGHT
    assert check_prediction("modes", set(), {"file"}).verdict == WRONG


def test_booleans_are_not_numbers():
    assert check_prediction("converges?", False, False).verdict == RIGHT
    assert check_prediction("converges?", True, False).verdict == WRONG
    assert check_prediction("converges?", 0, False).verdict == WRONG  # 0 is not an answer to yes/no


def test_a_nonsense_answer_is_wrong_not_an_error():
    assert check_prediction("ratio", "four", 1.0, rel=0.2).verdict == WRONG
    assert check_prediction("order", 3, ["a"]).verdict == WRONG


def test_order_of_and_grows():
    assert order_of({"events": 5.0, "reported": 2, "guest": None, "x": float("nan")}) == [
        "reported",
        "events",
    ]
    assert grows([256, 512, 1024], [10, 30, 60])
    assert not grows([256, 512, 1024], [10, 9, 11])
    assert not grows([256], [10])
    assert not grows([64, 128, 256], [7.0, 13.4, 27.1], min_rise=50)  # a few ms of noise is not growth
    assert grows([64, 128, 256], [103.5, 198.5, 432.9], min_rise=50)


def test_an_order_within_the_resolution_may_come_either_way():
    pauses = {"reported": 2, "events": 1.6, "guest": 17.1}
    assert check_order("order", ["reported", "events", "guest"], pauses, tie=1).verdict == RIGHT
    assert (
        check_order("order", ["pause_ms_events", "pause_ms_reported", "guest"], pauses, tie=1).verdict
        == RIGHT
    )
    assert check_order("order", ["guest", "events", "reported"], pauses, tie=1).verdict == WRONG
    assert check_order("order", ["events", "guest"], pauses, tie=1).verdict == WRONG  # one left out
    assert check_order("order", ["nonsense", "x", "y"], pauses).verdict == WRONG
    assert check_order("order", ..., pauses).verdict == NOT_YET
