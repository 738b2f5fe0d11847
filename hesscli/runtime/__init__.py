"""Where and within what the work runs: devices, memory budgets, progress, torch.distributed."""
