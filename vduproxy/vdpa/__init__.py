"""vDPA devices: the interface (device.py), the kernel driver (kernel.py) and the software device (sim.py)."""
