"""Benchmarks behind `proxmo bench ...`; each module has main(argv) -> int."""
