"""gpu-stats: GPU samples (service.py; NVML and nvidia-smi in readers.py)."""
