"""QEMU's qapi/ directory, the part a QMP server needs: error classes, argument visiting, command dispatch.

error (ErrorClass and the exception a command raises), qobject_input_visitor (arguments checked against a
schema), qmp_registry (the command table) and qmp_dispatch (one request in, one response out).
"""
