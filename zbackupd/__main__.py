"""``python -m zbackupd`` runs the command-line interface."""

from zbackupd.cli import main

raise SystemExit(main())
