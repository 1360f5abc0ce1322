"""The `vigil` command (main.py), its look-at-it commands (ctl.py), `vigil up` (up.py) and the embedded servers (stack.py)."""
