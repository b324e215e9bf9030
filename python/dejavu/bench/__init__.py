"""`dejavu bench ...`: benchmarks that always measure a baseline in the same run."""
