"""watcher: camera files on disk -> FileUploaded (service.py; the file rules in files.py)."""
