"""zbackupd: offline, offsite ZFS backups on rotated external disks.

This package's top level imports nothing heavy, so that ``zbackupd-gate`` (standard
library only, run on the backup server) can import its own modules without the
daemon's dependencies installed.
"""

__version__ = "0.1.0"
