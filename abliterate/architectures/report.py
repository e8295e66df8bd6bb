"""Printing what discovery found: a table, and a warning per layer it could not read."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from abliterate.architectures.discovery import Architecture


def components_table(architecture: Architecture) -> Table:
    table = Table(title=f"abliterable components ({architecture.num_layers} layers at {architecture.layers_path})")
    table.add_column("component")
    table.add_column("kernel")
    table.add_column("layers", justify="right")
    groups = {component.pattern: component.group for component in architecture.components}
    for pattern, count in sorted(architecture.component_counts().items()):
        table.add_row(pattern, groups[pattern], str(count))
    return table


def print_architecture(architecture: Architecture, console: Console) -> None:
    console.print(components_table(architecture))
    for index, class_name, children in architecture.unrecognised_layers:
        console.print(
            f"[yellow]warning:[/] layer {index} ({class_name}) has no recognised output projection; "
            f"children: {', '.join(children) or '(none)'} - it will not be edited"
        )
