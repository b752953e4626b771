"""Model family from structure (block layout, number of text encoders, cross-attention width).

Absolute sizes are used only where they are the only difference (SD1 vs SD2 cross width), so that
tiny test models with a real family's block structure are recognised as that family.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# flux and chroma are detected in checkpoints.flux, qwen-image (Qwen-Image and -Edit) in checkpoints.qwen,
# wan and wan-ti2v (Wan 2.2 TI2V-5B) in checkpoints.wan
FAMILIES = ("sd1", "sd2", "sdxl", "ssd-1b", "vega", "koala", "flux", "chroma", "qwen-image", "wan", "wan-ti2v",
            "unknown")
# SDXL and its depth-pruned kin: same widths, text encoders and key layout, fewer transformer blocks
# (and, for KOALA, one resnet + attention per encoder level); their layers are matched by similarity
SDXL_KIN = ("sdxl", "ssd-1b", "vega", "koala")

_BLOCK = re.compile(r"^unet\.(down_blocks\.(\d+)|up_blocks\.(\d+)|mid_block)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.")


@dataclass
class UnetStats:
    """What the family rules look at, read from canonical weight names and shapes."""

    levels: int = 0
    down_depths: list[list[int]] = field(default_factory=list)  # per level: depth of each attention
    up_depths: list[list[int]] = field(default_factory=list)
    mid_depths: list[int] = field(default_factory=list)
    cross_dim: int | None = None
    has_add_embedding: bool = False
    conv_proj_in: bool = False

    @property
    def total_blocks(self) -> int:
        return sum(map(sum, self.down_depths)) + sum(self.mid_depths) + sum(map(sum, self.up_depths))


def unet_stats(shapes: dict[str, tuple[int, ...]]) -> UnetStats:
    """Stats from {canonical module id: weight shape} (only `unet.` entries are looked at)."""
    depth: dict[tuple[str, int], dict[int, int]] = {}
    levels_down, levels_up = set(), set()
    st = UnetStats()
    for name, shape in shapes.items():
        if not name.startswith("unet."):
            continue
        m = re.match(r"^unet\.down_blocks\.(\d+)\.", name)
        if m:
            levels_down.add(int(m.group(1)))
        m = re.match(r"^unet\.up_blocks\.(\d+)\.", name)
        if m:
            levels_up.add(int(m.group(1)))
        if name.startswith("unet.add_embedding."):
            st.has_add_embedding = True
        if name.endswith(".attn2.to_k") and st.cross_dim is None:
            st.cross_dim = int(shape[1])
        if name.endswith(".proj_in") and len(shape) == 4:
            st.conv_proj_in = True
        m = _BLOCK.match(name)
        if m:
            stage = "mid" if m.group(1) == "mid_block" else m.group(1).split(".")[0]
            level = int(m.group(2) or m.group(3) or 0)
            att, blk = int(m.group(4)), int(m.group(5))
            per = depth.setdefault((stage, level), {})
            per[att] = max(per.get(att, 0), blk + 1)
    st.levels = max(len(levels_down), len(levels_up))

    def depths(stage: str, level: int) -> list[int]:
        per = depth.get((stage, level), {})
        return [per[a] for a in sorted(per)]

    st.down_depths = [depths("down_blocks", i) for i in range(st.levels)]
    st.up_depths = [depths("up_blocks", i) for i in range(st.levels)]
    st.mid_depths = depths("mid", 0)
    return st


def detect_family(st: UnetStats, te_hidden: dict[str, int]) -> str:
    """Family from structure. `te_hidden`: hidden width of each text encoder present."""
    if st.levels == 0 or st.cross_dim is None:
        return "unknown"
    if st.has_add_embedding:
        # SDXL layout: 3 levels, no attention at the first, two text encoders whose widths add up
        # to the cross-attention width (a UNet-only file has no encoders to check).
        if st.levels != 3 or st.down_depths[0] or not st.down_depths[1] or not st.down_depths[2]:
            return "unknown"
        if te_hidden:
            if set(te_hidden) != {"text_encoder", "text_encoder_2"} or sum(te_hidden.values()) != st.cross_dim:
                return "unknown"
        # KOALA (700M: depths [0,2,5], 1B: [0,2,6]) keeps one resnet + attention per encoder
        # level. SDXL: two per level, every attention of a level as deep, up levels mirror down
        # levels, and the middle block has attention as deep as the deepest level. Vega
        # ([0,0,1,1,2,2]) is as regular but has no attention in the middle block; SSD-1B prunes
        # blocks unevenly ([0,0,2,2,4,4] down, other depths up).
        if all(len(d) <= 1 for d in st.down_depths):
            return "koala"
        uniform = all(len(set(d)) <= 1 for d in st.down_depths + st.up_depths)
        mirrored = all(set(st.up_depths[i]) == set(st.down_depths[st.levels - 1 - i]) for i in range(st.levels))
        deepest = max(st.down_depths[2])
        if uniform and mirrored and st.mid_depths == [deepest]:
            return "sdxl"
        if uniform and mirrored and not st.mid_depths:
            return "vega"
        return "ssd-1b"
    if len(te_hidden) > 1 or st.levels != 4:
        return "unknown"
    if not all(st.down_depths[i] for i in range(3)) or st.down_depths[3]:
        return "unknown"
    if te_hidden and next(iter(te_hidden.values())) != st.cross_dim:
        return "unknown"
    if st.cross_dim == 768:
        return "sd1"
    if st.cross_dim == 1024:
        return "sd2"
    # small test models: SD1 projects with 1x1 convs, SD2 with linears
    return "sd1" if st.conv_proj_in else "sd2"
