"""`trainctl recipes`: the curated experiments of `recipes/` with their purpose, command and result."""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str]) -> None:
    from trainctl.config import recipe_headers

    for name, header in recipe_headers().items():
        print(f"{name}\n" + "\n".join(f"    {line}" for line in header.splitlines()) + "\n")
