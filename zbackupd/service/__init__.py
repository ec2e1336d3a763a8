"""The long-running daemon: sessions, control socket, sd_notify, journald logs, the state store."""
