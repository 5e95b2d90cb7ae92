"""What this host can run: probed once, reported by `bitbuilder-hostshim --check` and used by
the shim to refuse a runtime the host cannot run."""
