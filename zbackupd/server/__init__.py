"""What talks to or runs on the backup server: SSH remote, streaming transfer,
server-side pruning, the gate.

This ``__init__`` imports nothing: ``zbackupd-gate`` runs with the standard library only.
"""
