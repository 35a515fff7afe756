"""The QMP server inside each emulated VM process, built to behave like QEMU 10.0's monitor.

A real QMP client (qemu.qmp's ``QMPClient``, its legacy ``QEMUMonitorProtocol``, ``qmp-shell``) should not be
able to tell this server from QEMU on the commands it has, so it is a set of small Python ports of the QEMU
files a learner can read side by side:

=====================================  =======================================================================
labkit.vm                              QEMU 10.0
=====================================  =======================================================================
``qobject.json_lexer.JSONLexer``       qobject/json-lexer.c   (the same state table, error recovery)
``qobject.json_streamer``              qobject/json-streamer.c (brace counting, size/nesting limits)
``qobject.json_parser``                qobject/json-parser.c  (error texts, QNum int64/uint64/double)
``qobject.json_writer``                qobject/json-writer.c  (``"%.17g"``, ``\\uXXXX`` escapes)
``qobject.qdict.qdict_order``          qobject/qdict.c        (tdb_hash buckets decide member order)
``qapi.qobject_input_visitor``         qapi/qobject-input-visitor.c (``Parameter 'x' is missing`` ...)
``qapi.qmp_dispatch``                  qapi/qmp-dispatch.c    (``QMP input member 'x' is unexpected``)
``monitor.qmp.QMPSession``             monitor/qmp.c          (greeting, negotiation, request queue)
``monitor.qmp_cmds_control``           monitor/qmp-cmds-control.c (qmp_capabilities, query-version ...)
``monitor.monitor.Monitor``            monitor/monitor.c      (events) and chardev/char-socket.c (listening)
=====================================  =======================================================================

Deliberate differences from QEMU (all in the direction of "never hurts a client"):

* A message larger than ``MAX_MESSAGE_SIZE`` (1 MiB; QEMU allows 64 MiB) is answered with QEMU's
  ``JSON token size limit exceeded`` and the rest of that object is *discarded* (braces are still
  counted, nothing is buffered, a lexical error such as a 0xFF byte ends it) instead of being
  re-lexed as new messages. The connection stays open.
* Non-finite floats returned by a handler are written as ``null`` (QEMU would write ``inf``).
* When a client half-closes its socket, requests already received are still answered.
* With several unexpected arguments, the one reported first follows QDict order (QEMU: GHashTable).
"""
