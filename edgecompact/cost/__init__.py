"""Cost models of an architecture: FLOPs and parameters (flops.py), latency tables (latency.py), roofline."""
