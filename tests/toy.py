"""A minimal task and data module for testing the training harness without diffusion models."""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class ToyData(L.LightningDataModule):
    def __init__(self, n: int = 64, batch_size: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 4, generator=g)
        self.data = TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]))
        self.batch_size = batch_size

    def train_dataloader(self):
        # A fixed order: resuming at an epoch boundary then replays exactly the same batches.
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False)


class ToyTask(L.LightningModule):
    def __init__(self, optimizer, hidden: int = 8):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return self.optimizer(self.parameters())
