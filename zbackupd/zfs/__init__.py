"""The ZFS command layer: pure argv builders and parsers, one runner, one facade."""
