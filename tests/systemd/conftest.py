"""The systemd glue without systemd: generator, installer, executor arguments, networkd file.

These run anywhere (no root, no PID 1 systemd); the booted behaviour is in tests/system.
"""
