"""`trainctl show [OVERRIDES]`: the resolved run spec and the plan (parameters, batch, steps, device,
precision) without training or writing anything."""

from __future__ import annotations

import os
from typing import Sequence


def main(argv: Sequence[str]) -> None:
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.table import Table

    from trainctl import config
    from trainctl.spec import spec_yaml

    if any(a in ("-h", "--help") for a in argv):
        print("usage: trainctl show [OVERRIDES...]\n\nPrint the resolved run spec and the plan without training.")
        return
    _, spec = config.compose_spec(argv, os.getcwd())
    console = Console()
    # soft_wrap: a long path stays one line (copyable), whatever the terminal's width
    console.print(Syntax(spec_yaml(spec), "yaml", theme="ansi_dark", background_color="default"), soft_wrap=True)
    console.print("options: " + " ".join(_chosen(spec)), soft_wrap=True)
    from trainctl.build import build_run
    from trainctl.plan import plan

    table = Table(title="plan", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in plan(build_run(spec, base_dir=os.getcwd())).items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


def _chosen(spec: object) -> list:
    """`group=option` for every group of the table that has options (what the command line picked)."""
    from trainctl.groups import GROUPS
    from trainctl.model import model_name

    out = []
    for group in GROUPS.values():
        node = getattr(spec, group.name)
        if group.many:
            out.append(f"{group.name}=[{','.join(node)}]")
        elif group.name == "model":
            out.append(f"model={model_name(node)}")
        elif group.options is not None:
            out.append(f"{group.name}={node.name}")
    return out
