"""Running a stage: what every stage shares (params, preflight, tracking, exit codes), the runtime (device,
threads, precision, seeds) and torch.distributed."""
