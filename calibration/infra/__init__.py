"""Infrastructure every stage leans on: atomic artifacts, locks, batch sizes, profiling, sharding over processes, errors."""
