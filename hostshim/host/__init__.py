"""Layers on the host itself: sysext/confext trees from a signed git revision, merged over the
host's /usr and /etc with systemd-sysext and systemd-confext (never into a tenant)."""
