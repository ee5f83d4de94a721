"""What a server shows of itself: Prometheus metrics and structured logs."""
