"""How a run runs: argument checks, the optimizer, FSDP2 under torchrun, CPU speedups."""
