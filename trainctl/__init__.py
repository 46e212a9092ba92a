"""trainctl: a config-driven PyTorch training CLI.

Hydra config groups (model, data, optimizer, scheduler, regularization, precision, loss, trainer,
logging) compose into one validated :class:`trainctl.spec.RunSpec`; :func:`trainctl.build.build_run`
turns it into objects and :class:`trainctl.runner.Runner` trains them.
"""

__version__ = "0.1.0"
