"""Architecture discovery: decoder layers and the projections abliteration edits."""

from abliterate.architectures.discovery import (
    ATTN,
    GROUPS,
    MLP,
    Architecture,
    Component,
    discover,
    find_decoder_layers,
)

__all__ = ["ATTN", "GROUPS", "MLP", "Architecture", "Component", "discover", "find_decoder_layers"]
