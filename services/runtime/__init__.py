"""The runtime every service shares the same way: config, logging, bus, sd_notify, lifecycle."""
