"""Stand-alone baseline programs that the benchmarks run as child processes."""
