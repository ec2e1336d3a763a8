"""The real-ZFS QEMU VM harness: image builder, controller, fixtures, smoke tests."""
