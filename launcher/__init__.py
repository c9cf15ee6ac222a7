"""The ``distill`` command line: a thin front that imports nothing heavy at start-up."""
