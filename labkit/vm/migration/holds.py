"""The points where labkit can hold a migration (x-labkit-hold, -x-hold): a leaf, so the option parser can
check a name without importing the migration engine that stops there."""

#: Where a migration can be held so a learner can look at both processes mid-way (x-labkit, generalising
#: QEMU's pause-before-switchover + migrate-continue to named points). Each waits for x-labkit-continue.
HOLD_POINTS = {
    "cpr-load": "destination: CPR state is in its socket, not yet read (no monitor yet: continue with SIGUSR1)",
    "cpr-hup": "source: the destination hung up the cpr channel; the main channel is not connected yet",
    "switchover": "source: pre-copy converged; the guest is about to stop for stop-and-copy",
    "main-connected": "source: main channel connected (CPR modes: guest stopped); nothing sent on it yet",
    "loaded": "destination: the whole stream is loaded; the guest is about to resume",
    "cpr-exec": "source: device state saved, migration completed; the old program is about to exec the new one",
}
