"""health: verdicts, alerts and the status page (service.py; what it reads in checks.py, the HTTP side in web.py)."""
