"""Evaluation: one pass over the validation batches that keeps the sufficient statistics of every
metric on the device - the loss sum and its term count, a confusion matrix for classes, squared and
absolute error sums for regression targets - adds them up across ranks (one all-reduce each), and
reads them once at the end.

Metrics: `val/loss` (the criterion without label smoothing), classification `val/acc` and macro
`val/f1` (over the classes that occur in the targets or the predictions, as torchmetrics averages),
regression `val/mse` and `val/mae` in the targets' own units (averaged over targets), language
modelling `val/ppl` = exp(mean token loss). The suite checks each against torchmetrics.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, List

if TYPE_CHECKING:
    import torch

    from trainctl.arrays import DataInfo
    from trainctl.batches import Batches
    from trainctl.loss import SumLoss


class Evaluator:
    """Runs the model over the validation batches and returns the task's metrics as floats."""

    def __init__(self, info: "DataInfo", loss: "SumLoss", device: "torch.device", equal_calls: bool = False,
                 dist: Any = None) -> None:
        self.info, self.loss, self.device, self.dist = info, loss, device, dist
        self.equal_calls = equal_calls
        """FSDP: every rank must call the model as often as the others (each call gathers parameters
        with them), so a rank with a shorter validation share runs extra one-sample forwards."""
        self.classes = info.num_classes if info.task == "classification" else 0

    def _zeros(self) -> Dict[str, "torch.Tensor"]:
        import torch

        stats = {"loss": torch.zeros((), device=self.device)}
        if self.classes:
            stats["confusion"] = torch.zeros(self.classes * self.classes, dtype=torch.long, device=self.device)
        elif self.info.task == "regression":
            targets = self.info.num_targets
            stats.update(se=torch.zeros(targets, device=self.device), ae=torch.zeros(targets, device=self.device),
                         rows=torch.zeros((), device=self.device))
        return stats

    def _update(self, stats: Dict[str, "torch.Tensor"], outputs: "torch.Tensor", targets: "torch.Tensor") -> None:
        import torch

        if self.classes:
            preds = (outputs[:, 0] > 0).long() if outputs.shape[-1] == 1 else outputs.argmax(-1)
            stats["confusion"] += torch.bincount(targets * self.classes + preds, minlength=self.classes ** 2)
        elif self.info.task == "regression":
            if self.info.target_mean is not None:  # report errors in the data's own units
                mean = torch.tensor(self.info.target_mean, device=outputs.device)
                std = torch.tensor(self.info.target_std, device=outputs.device)
                outputs, targets = outputs * std + mean, targets * std + mean
            error = outputs.reshape(len(outputs), -1) - targets.reshape(len(targets), -1)
            stats["se"] += (error * error).sum(0)
            stats["ae"] += error.abs().sum(0)
            stats["rows"] += len(outputs)

    def __call__(self, model: "torch.nn.Module", batches: "Batches",
                 autocast: Callable[[], ContextManager]) -> Dict[str, float]:
        import torch

        stats, terms = self._zeros(), 0
        was_training = model.training
        model.eval()
        # FSDP keeps gathered parameters for the next forward; inference tensors could not be reused
        with torch.no_grad() if self.equal_calls else torch.inference_mode():
            for x, y in batches.epoch(0):
                with autocast():
                    outputs = model(x)
                outputs = outputs.float()
                stats["loss"] += self.loss(outputs, y)
                terms += self.loss.count(y)  # from shapes: no device work
                self._update(stats, outputs, y)
            for _ in range(batches.shortfall() if self.equal_calls else 0):
                with autocast():
                    model(batches.first()[0][:1])
        model.train(was_training)
        stats["terms"] = torch.tensor(float(terms), device=self.device)
        if self.dist is not None:  # every rank's share: the same metrics on every rank
            for value in stats.values():
                self.dist.sum(value)
        return self._metrics({k: v.tolist() for k, v in stats.items()})  # the one read of the device

    def _metrics(self, stats: Dict[str, Any]) -> Dict[str, float]:
        loss = stats["loss"] / max(stats["terms"], 1)
        metrics = {"val/loss": loss}
        if self.classes:
            metrics.update(_classification(stats["confusion"], self.classes))
        elif self.info.task == "regression":
            rows = max(stats["rows"], 1)
            metrics["val/mse"] = sum(stats["se"]) / len(stats["se"]) / rows
            metrics["val/mae"] = sum(stats["ae"]) / len(stats["ae"]) / rows
        else:
            metrics["val/ppl"] = math.exp(loss)
        return metrics


def _classification(flat: List[int], classes: int) -> Dict[str, float]:
    """Accuracy and macro F1 from a confusion matrix (rows: true class, columns: predicted)."""
    import numpy as np

    confusion = np.asarray(flat, dtype=np.int64).reshape(classes, classes)
    tp = np.diag(confusion)
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    present = (tp + fp + fn) > 0  # a class absent from targets and predictions does not count
    f1 = 2 * tp[present] / (2 * tp + fp + fn)[present]
    return {"val/acc": float(tp.sum() / max(confusion.sum(), 1)), "val/f1": float(f1.mean()) if present.any() else 0.0}
