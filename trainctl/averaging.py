"""The `averaging` config group: an average of the weights kept beside the trained ones, built on
``torch.optim.swa_utils``.

- `ema`: an exponential moving average, updated every `every_n_steps` optimizer steps. The first update
  copies the weights; the k-th update after it (k = 1, 2, ...) moves the average towards the weights by
  ``1 - decay_k``, with ``decay_k = min(decay, (1 + k) / (10 + k))`` under `warmup`, else ``decay``.
  `half_life_steps` H sets ``decay = 0.5 ** (every_n_steps / H)``. Buffers (batch-norm statistics)
  are averaged the same way or copied from the model; integer buffers are always copied.
- `swa`: stochastic weight averaging. From epoch `start_epoch` (counted from 0; or `start_fraction`
  of the run's epochs) torch's SWALR sets the learning rate instead of the run's schedule, annealing
  to `swa_lr` over `anneal_epochs`; the weights at the end of that epoch and of every later one are
  averaged with equal weights. Buffers are copied from the model at each snapshot; at the end of the
  run, batch-norm statistics are recomputed over the training data under the averaged weights.

With `use_for_eval` the evaluations see the averaged weights (swapped in for the evaluation and back
after it), so `best` is chosen on them, and the run's final `model.safetensors` holds them. The
weights a checkpoint saves stay the trained ones (a resume continues from them); the average is saved
in the checkpoint's state, and `trainctl eval` / `trainctl export` of a checkpoint load it
(:func:`use_averaged`). The specs are in :mod:`trainctl.averaging_specs`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from trainctl.averaging_specs import AveragingSpec, EMASpec, SWASpec
from trainctl.callbacks import BuildContext, Callback, CallbackEntry
from trainctl.errors import ConfigError, check
from trainctl.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainctl.build import Run
    from trainctl.state import RunState

log = logging.getLogger("trainctl")


AVERAGINGS: Registry[CallbackEntry] = Registry("averaging")
"""The `averaging` options: their schemas (and the callback's builder, :data:`AVERAGING`)."""


# --- the callback ------------------------------------------------------------------------------------

def _tensors(module: "nn.Module") -> List["torch.Tensor"]:
    return list(module.parameters()) + list(module.buffers())


def _copy(dst: List["torch.Tensor"], src: List["torch.Tensor"]) -> None:
    import torch

    if dst:
        with torch.no_grad():
            torch._foreach_copy_(dst, src)


class Averaging(Callback):
    """The averaged copy (an AveragedModel), its updates, and the swap for evaluation and the final
    weights; set up in ``on_fit_start`` (after a resume restored the trained weights and this state)."""

    name = "averaging"

    def __init__(self, spec: AveragingSpec) -> None:
        self.spec = spec
        self.updates = 0  # updates of the average so far (SWA: snapshots)
        self.averaged: Any = None
        self._pending: Optional[Dict[str, Any]] = None
        self._backup: Optional[List["torch.Tensor"]] = None

    def _setup(self, run: "Run") -> None:
        """The AveragedModel: a deep copy of ``run.model``, its tensors in the same order."""

    def on_fit_start(self, run: "Run", state: "RunState") -> None:
        self._setup(run)
        if self._pending is not None:
            self._load_weights(self._pending["weights"])
            self.updates = int(self._pending["updates"])
            self.averaged.n_averaged.fill_(self.updates)

    def _load_weights(self, weights: Dict[str, "torch.Tensor"]) -> None:
        self.averaged.module.load_state_dict(weights, strict=set(weights) == set(self.averaged.module.state_dict()))

    # evaluation and the final weights
    @property
    def _swapping(self) -> bool:  # no average before its first update: the trained weights are evaluated
        return self.spec.evaluates_average and self.updates > 0 and self.averaged is not None

    def on_eval_start(self, run: "Run", state: "RunState") -> None:
        if self._swapping:
            self._backup = [t.detach().clone() for t in _tensors(run.model)]
            _copy(_tensors(run.model), _tensors(self.averaged.module))

    def on_eval_end(self, run: "Run", state: "RunState", metrics: Dict[str, float]) -> None:
        if self._backup is not None:
            _copy(_tensors(run.model), self._backup)
            self._backup = None

    def on_fit_end(self, run: "Run", state: "RunState") -> None:
        if self._swapping:  # the final model.safetensors holds the average
            _copy(_tensors(run.model), _tensors(self.averaged.module))

    def state_dict(self) -> Dict[str, Any]:
        if self.averaged is None:  # not set up in this session: what was loaded
            return dict(self._pending or {"updates": 0, "weights": {}})
        from trainctl.files import saved_keys

        weights = self.averaged.module.state_dict()
        keys = saved_keys(self.averaged.module)
        if keys is not None:  # frozen weights never change: only what a checkpoint of the model holds
            weights = {k: weights[k] for k in keys}
        return {"updates": self.updates, "weights": weights}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._pending = state


class EMA(Averaging):
    spec: EMASpec

    def _setup(self, run: "Run") -> None:
        import torch
        from torch.optim.swa_utils import AveragedModel
        from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

        spec = self.spec
        self.averaged = AveragedModel(run.model, multi_avg_fn=self._lerp,
                                      use_buffers=spec.buffers == "average").requires_grad_(False)
        # bf16/fp16 weights (precision=bf16_true): the average is kept in fp32, or an update of (1 - decay)
        # times a small difference would round away and the average would stop moving
        if any(t.dtype in (torch.bfloat16, torch.float16) for t in _tensors(self.averaged.module)):
            self.averaged.module.float()
        pairs = [(a, p) for a, p in zip(self.averaged.module.parameters(), run.model.parameters()) if p.requires_grad]
        copied = []
        for a, b in zip(self.averaged.module.buffers(), run.model.buffers()):
            (pairs if spec.buffers == "average" and b.is_floating_point() else copied).append((a, b))
        grouped = _group_tensors_by_device_and_dtype([[p for _, p in pairs], [a for a, _ in pairs]])
        self._groups: List[Tuple[List, List, Optional[List]]] = [
            (avg, cur, [torch.empty_like(a) for a in avg] if cur[0].dtype != avg[0].dtype else None)
            for (cur, avg), _ in grouped.values()]
        """The averaged tensors, the model's and (when their dtypes differ) an fp32 copy of the model's, by
        device and dtype: one foreach lerp per group."""
        self._copied = ([a for a, _ in copied], [b for _, b in copied])
        self._all = ([a for a, _ in pairs] + self._copied[0], [p for _, p in pairs] + self._copied[1])
        self._decay = spec.base_decay

    def _lerp(self, averaged: List["torch.Tensor"], current: List["torch.Tensor"], _: Any) -> None:
        """The AveragedModel's multi_avg_fn: averaged += (1 - decay) * (current - averaged), in one foreach op."""
        import torch

        torch._foreach_lerp_(averaged, current, 1.0 - self._decay)

    def on_step_end(self, run: "Run", state: "RunState") -> None:
        if state.step % self.spec.every_n_steps:
            return
        import torch

        # The AveragedModel's own update_parameters walks the parameters in Python and reads its
        # counter back from the device; here the lists are made once and the count stays on the host.
        with torch.no_grad():
            if self.updates == 0:
                torch._foreach_copy_(*self._all)
            else:
                self._decay = self.spec.decay_at(self.updates)
                for averaged, current, widened in self._groups:
                    if widened is not None:
                        torch._foreach_copy_(widened, current)
                    self.averaged.multi_avg_fn(averaged, current if widened is None else widened, None)
                _copy(*self._copied)
            self.averaged.n_averaged += 1
        self.updates += 1


class SWA(Averaging):
    spec: SWASpec

    def __init__(self, spec: SWASpec) -> None:
        super().__init__(spec)
        self.start_epoch: Optional[int] = None
        self.swalr: Any = None
        self.bn_done = False

    def _setup(self, run: "Run") -> None:
        from torch.optim.swa_utils import AveragedModel, get_swa_multi_avg_fn

        self.averaged = AveragedModel(run.model, multi_avg_fn=get_swa_multi_avg_fn()).requires_grad_(False)
        horizon = run.horizon
        whole_epochs = horizon.total_steps // horizon.steps_per_epoch
        self.start_epoch = self.spec.start(horizon.total_epochs) if self.start_epoch is None else self.start_epoch
        if not self._pending or self._pending.get("swalr") is None:
            check(self.start_epoch < whole_epochs, "averaging.start_epoch", f"SWA would start in epoch "
                  f"{self.start_epoch}, but the run has {whole_epochs} whole epoch(s): no snapshot would be taken",
                  f"set averaging.start_epoch={max(0, whole_epochs - 1)} or train longer")

    def on_fit_start(self, run: "Run", state: "RunState") -> None:
        pending = self._pending
        super().on_fit_start(run, state)
        if pending is not None and pending.get("swalr") is not None:
            self._start_swalr(run)
            self.swalr.load_state_dict(pending["swalr"])
            self._impose_lr(run)
        elif state.step == 0 and self.start_epoch == 0:
            self._start_swalr(run)

    def _start_swalr(self, run: "Run") -> None:
        from torch.optim.swa_utils import SWALR

        spec, peak = self.spec, run.spec.optimizer.lr
        lrs = [g.get("initial_lr", g["lr"]) for g in run.optimizer.param_groups]
        if spec.swa_lr is not None:
            lrs = [spec.swa_lr * lr / peak if peak else spec.swa_lr for lr in lrs]
        self.swalr = SWALR(run.optimizer, lrs, anneal_epochs=spec.anneal_epochs * run.horizon.steps_per_epoch,
                           anneal_strategy=spec.anneal_strategy)

    def _impose_lr(self, run: "Run") -> None:
        """SWALR's lr in every group (the run's schedule stepped too, or a plateau schedule changed it)."""
        for group, lr in zip(run.optimizer.param_groups, self.swalr.get_last_lr()):
            group["lr"] = lr

    def on_step_end(self, run: "Run", state: "RunState") -> None:
        if self.swalr is not None:  # the step after the run's schedule: SWALR's lr replaces its lr
            self._impose_lr(run)
            self.swalr.step()
        per_epoch = run.horizon.steps_per_epoch
        if state.step % per_epoch == 0:
            epochs_done = state.step // per_epoch
            if epochs_done > self.start_epoch:  # the end of an epoch from start_epoch on
                self.averaged.update_parameters(run.model)
                self.updates += 1
            elif epochs_done == self.start_epoch and self.swalr is None:
                self._start_swalr(run)
        if state.step >= run.horizon.total_steps:
            self._recompute_bn(run, state)

    def on_eval_end(self, run: "Run", state: "RunState", metrics: Dict[str, float]) -> None:
        super().on_eval_end(run, state, metrics)
        if self.swalr is not None:
            self._impose_lr(run)

    def on_fit_end(self, run: "Run", state: "RunState") -> None:
        if state.stop_reason in ("completed", "early_stopped"):
            self._recompute_bn(run, state)
        super().on_fit_end(run, state)

    def _recompute_bn(self, run: "Run", state: "RunState") -> None:
        """Batch-norm statistics of the training data under the averaged weights (torch's update_bn, on
        the model with the average swapped in; the RNG states are left as they were). Under DDP every rank
        takes the mean of the ranks' statistics, so all hold the same."""
        import torch
        from torch.nn.modules.batchnorm import _BatchNorm
        from torch.optim.swa_utils import update_bn

        if self.bn_done or self.updates == 0 or not any(isinstance(m, _BatchNorm) for m in run.model.modules()):
            return
        self.bn_done = True
        model, averaged = _tensors(run.model), _tensors(self.averaged.module)
        backup = [t.detach().clone() for t in model]
        devices = [run.device] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), run.precision.autocast():
            _copy(model, averaged)
            update_bn(run.data.train.epoch(state.epoch), run.model)
        if run.dist is not None:  # each rank saw its share of every batch: the mean over all of them
            for bn in (m for m in run.model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None):
                for stat in (bn.running_mean, bn.running_var):
                    stat.div_(run.world_size)
                    run.dist.sum(stat)
        _copy(list(self.averaged.module.buffers()), list(run.model.buffers()))
        _copy(model, backup)
        log.info("batch-norm statistics recomputed over the training data under the averaged weights")

    def state_dict(self) -> Dict[str, Any]:
        saved = super().state_dict()
        swalr = None if self.swalr is None else {k: v for k, v in self.swalr.state_dict().items() if not callable(v)}
        return saved if self.averaged is None else {**saved, "start_epoch": self.start_epoch, "swalr": swalr,
                                                    "bn_done": self.bn_done}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.start_epoch = state.get("start_epoch")
        self.bn_done = bool(state.get("bn_done", False))


def build_averaging(spec: AveragingSpec, ctx: BuildContext) -> Optional[Callback]:
    if isinstance(spec, EMASpec):
        return EMA(spec)
    if isinstance(spec, SWASpec):
        return SWA(spec)
    return None


AVERAGING = CallbackEntry(AveragingSpec, build_averaging)
"""Weight averaging is configured by its own group (`averaging=ema`), built like any callback."""
for _name, _spec in (("none", AveragingSpec), ("ema", EMASpec), ("swa", SWASpec)):
    AVERAGINGS.add(_name, CallbackEntry(_spec, build_averaging))


def use_averaged(run: "Run", saved_state: Dict[str, Any]) -> bool:
    """`trainctl eval` / `export` of a checkpoint: put the checkpoint's averaged weights into ``run.model``
    when its spec says `averaging.use_for_eval` and an average was taken. Returns whether it did."""
    if not run.spec.averaging.evaluates_average:
        return False
    saved = (saved_state.get("callbacks") or {}).get(Averaging.name)
    if not saved or not saved.get("updates"):
        return False
    weights = saved["weights"]
    try:
        run.model.load_state_dict(weights, strict=set(weights) == set(run.model.state_dict()))
    except RuntimeError as exc:
        raise ConfigError(None, f"the averaged weights saved with the checkpoint do not fit the model: "
                          f"{' '.join(str(exc).split())[:400]}") from None
    log.info("evaluating the averaged weights (%s, %d updates)", run.spec.averaging.name, saved["updates"])
    return True
