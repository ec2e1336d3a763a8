"""zbackupd test suites."""
