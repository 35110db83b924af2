"""Benchmarks of pallas_mlstm against its peers (`python -m pallas_mlstm bench`) and the config sweep (`tune`)."""
