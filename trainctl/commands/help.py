"""`trainctl run --help`: the config groups, their options and defaults, from the table of groups
(:mod:`trainctl.groups`) and `conf/train.yaml`'s defaults list. No torch, no Hydra."""

from __future__ import annotations

from typing import Dict

HEADER = """trainctl run: train a model described by composable config groups.

Usage: trainctl run [GROUP=OPTION] [KEY=VALUE] [+recipe=NAME] [-m] [--cfg job] [--info]

Config groups: pick an option with GROUP=OPTION (* the default), a field with GROUP.KEY=VALUE;
callbacks and transforms take a list: 'callbacks=[lr_monitor]'.
"""
FOOTER = """Examples:
  trainctl run                                            digits MLP, the embedded default
  trainctl run optimizer=sgd scheduler=onecycle optimizer.lr=0.1
  trainctl run model=cnn trainer.max_epochs=10
  trainctl run data=csv data.path=my.csv data.target=label
  trainctl run -m optimizer=adamw,sgd scheduler=cosine,onecycle
  trainctl run +recipe=digits_cnn
`trainctl show [overrides]` prints the resolved spec and the plan without training; `trainctl recipes`
lists the recipes. Hydra's own options: trainctl run --hydra-help"""


def defaults() -> Dict[str, str]:
    """Group -> default option, from `conf/train.yaml`'s defaults list."""
    import yaml

    from trainctl.groups import CONF_DIR

    chosen: Dict[str, str] = {}
    for entry in yaml.safe_load((CONF_DIR / "train.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                if not str(key).startswith(("override", "hydra")):
                    chosen[str(key)] = str(value)
    return chosen


def print_run_help() -> None:
    from trainctl.groups import GROUPS

    chosen = defaults()
    lines = [HEADER]
    for group in GROUPS.values():
        options = ", ".join(f"{name}*" if name == chosen.get(group.name) else name for name in group.option_names())
        lines.append(f"  {group.name}: {options}")
        lines.append(f"      {group.doc}")
    print("\n".join(lines) + "\n\n" + FOOTER)
