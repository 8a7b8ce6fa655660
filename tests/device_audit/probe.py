"""The audit's own check: a factory call without a device, from a project file, that must be recorded."""

import torch

if __name__ == "__main__":
    torch.zeros(3)  # deliberately without a device
    torch.zeros(3, device="cpu")  # named: not recorded
