"""The GPU area: NVML, admission and placement, a Space's claim, the quota watchdog, telemetry."""
