"""retention: keeps the disk and the database in bounds (service.py; the media walk in media.py)."""
