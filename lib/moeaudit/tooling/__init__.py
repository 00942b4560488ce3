"""Tooling beside the library, never imported by it: the book driver (:mod:`.book`), the chapters'
parameter schemas (:mod:`.params`), the bad-inputs table (:mod:`.badinputs`), the training command
of the shipped models (:mod:`.training`) and the tiny random models of the test suite (:mod:`.testing`)."""
