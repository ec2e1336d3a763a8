"""Pure decisions over frozen dataclasses: no I/O, no processes."""
