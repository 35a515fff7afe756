"""QEMU's qobject/ directory: the JSON a QMP monitor reads and writes, ported file by file.

json_lexer (bytes to tokens), json_streamer (tokens to messages), json_parser (a message to Python values),
json_writer (values to QEMU's compact JSON), qdict (the member order QEMU's hash table gives), qnum (the
integer ranges of QNum) and unicode (util/unicode.c, which the parser and the error texts use).
"""
