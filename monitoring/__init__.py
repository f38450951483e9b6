"""GPU telemetry (NVML and a scenario-driven fake) and Prometheus metrics."""
