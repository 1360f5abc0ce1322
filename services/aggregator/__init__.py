"""aggregator: Detections -> events and their fast-path alerts (service.py; the grouping contract in grouping.py)."""
