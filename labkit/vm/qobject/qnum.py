"""The ranges of QEMU's QNum (qobject/qnum.c): an integer is an int64 if it fits, else a uint64, else a double.

The JSON parser and the QAPI input visitor both decide by these bounds, so they live in one place.
"""

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
