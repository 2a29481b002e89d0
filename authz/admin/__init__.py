"""The HTTP admin port: health, readiness and metrics."""
