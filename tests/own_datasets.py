"""A small Dataset for tests that compose `data=custom` without a module of their own."""

import torch
from torch.utils.data import Dataset


class Pairs(Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.tensor([float(i), float(i % 3)]), i % 2
