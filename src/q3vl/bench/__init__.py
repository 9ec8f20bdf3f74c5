"""The benchmark harness: the reference and every runtime variant on identical workloads."""
