"""Workshop exercises, predict then reveal: the learner writes an answer, a check says right or wrong and why.

Each exercise has seeded variants, the OSTEP way: `EXERCISES` lists the exercise ids and
`variant(exercise_id, seed=N)` returns that variant's parameters (RAM size, dirty rate, bandwidth, memory
backend, which option is off), so every attendee gets their own numbers and must apply the method, not recall
an answer. `check(exercise_id, answer, seed=N)` runs the variant. Where the answer is a measurement the check
runs real migrations on the backend asked for and judges the answer against what they measured, with a
tolerance taken from the run's own spread (the pause's three measures, or the order of magnitude the question
asks for). Where it is one of QEMU's rules (which config cpr-transfer accepts, what its refusal names) the
check asks a real VM, which speaks QEMU 10's texts; any correct answer passes (any blocked block, not the first
of QEMU's list). A check never raises: a missing answer or a template still holding `...` says "not answered
yet", a malformed one says what it could not read. Measurements are cached per setting, so changing an answer
and checking again is instant; `clear_cache()` measures afresh.

One module per exercise notebook (pauses, main_bytes, converge, cpr_config, refusals, inode, cpr_exec) on a
common ground (checking: the Check, reading answers, the cache; variants: the seeded parameters). Importing
the package registers every check, in the notebooks' order.
"""

from labkit.teach.exercises.checking import CHECKS, CPR_BLOCKER_RE, Check, check, clear_cache
from labkit.teach.exercises.variants import EXERCISES, my_seed, variant

# the exercises, in the notebooks' order: each module registers its checks in CHECKS when imported
from labkit.teach.exercises.pauses import check_least_pause, measure_pauses  # isort: skip
from labkit.teach.exercises.main_bytes import BYTES_FACTOR, check_main_channel_bytes, measure_bytes  # isort: skip
from labkit.teach.exercises.converge import check_converges, converge_model  # isort: skip
from labkit.teach.exercises.cpr_config import check_cpr_config  # isort: skip
from labkit.teach.exercises.refusals import check_blocked_block, check_cpr_error_text, refusal  # isort: skip
from labkit.teach.exercises.inode import check_inode, measure_inodes  # isort: skip
from labkit.teach.exercises.cpr_exec import check_cpr_exec_pause, measure_cpr_exec  # isort: skip

__all__ = [
    "BYTES_FACTOR",
    "CHECKS",
    "CPR_BLOCKER_RE",
    "EXERCISES",
    "Check",
    "check",
    "check_blocked_block",
    "check_converges",
    "check_cpr_config",
    "check_cpr_error_text",
    "check_cpr_exec_pause",
    "check_inode",
    "check_least_pause",
    "check_main_channel_bytes",
    "clear_cache",
    "converge_model",
    "measure_bytes",
    "measure_cpr_exec",
    "measure_inodes",
    "measure_pauses",
    "my_seed",
    "refusal",
    "variant",
]
