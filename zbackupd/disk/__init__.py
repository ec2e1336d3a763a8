"""The attached disk: udev identity, the device-mapper layer, power-off, init and the udev rule."""
