"""Not the product: a farm of real `netq run` processes on this machine, for `netq demo`, tests and benchmarks."""
