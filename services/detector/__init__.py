"""detector: FileUploaded -> Detections (service.py; the model and its backends in engine.py, backends.py, trt.py)."""
