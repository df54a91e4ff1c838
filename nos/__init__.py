"""nos: Neural Optimizer Search. Learns update rules; any rule is a torch.optim.Optimizer."""

__version__ = "0.1.0"
