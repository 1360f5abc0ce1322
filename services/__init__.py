"""vigil's services: one module per process, each with one `async def run(config)`."""

VERSION = "0.1.0"
