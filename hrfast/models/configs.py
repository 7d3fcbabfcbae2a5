"""The standard HRNet stage configurations (HRNET_LAYOUTS.md section 6), in the official yaml's layout.

Each configuration is a dict ``{"STAGE1": ..., "STAGE4": ...}`` whose stage dicts carry the official keys
``NUM_MODULES``, ``NUM_BRANCHES``, ``BLOCK`` (``"BASIC"`` or ``"BOTTLENECK"``), ``NUM_BLOCKS``, ``NUM_CHANNELS`` and
``FUSE_METHOD`` (always ``"SUM"``), as in ``MODEL.EXTRA`` of the MSRA yamls; the models keep them as
``stage{2,3,4}_cfg`` and read ``NUM_BRANCHES`` from them in forward, as the official code does. They agree with
timm's ``cfg_cls`` (lower-case keys there).
"""
from __future__ import annotations

import copy
from typing import Dict, List

__all__ = ["STAGE_CONFIGS", "stage_config", "branch_channels"]


def _stage(modules: int, branches: int, block: str, blocks: List[int], channels: List[int]) -> Dict:
    return {"NUM_MODULES": modules, "NUM_BRANCHES": branches, "BLOCK": block, "NUM_BLOCKS": list(blocks),
            "NUM_CHANNELS": list(channels), "FUSE_METHOD": "SUM"}


def _width(c: int) -> Dict[str, Dict]:
    """W{c}: 1 / 1 / 4 / 3 modules, 4 blocks per branch, branch channels c, 2c, 4c, 8c."""
    return {
        "STAGE1": _stage(1, 1, "BOTTLENECK", [4], [64]),
        "STAGE2": _stage(1, 2, "BASIC", [4, 4], [c, 2 * c]),
        "STAGE3": _stage(4, 3, "BASIC", [4, 4, 4], [c, 2 * c, 4 * c]),
        "STAGE4": _stage(3, 4, "BASIC", [4, 4, 4, 4], [c, 2 * c, 4 * c, 8 * c]),
    }


STAGE_CONFIGS: Dict[str, Dict[str, Dict]] = {
    # W18-small-v1 (timm hrnet_w18_small): 3 fusing modules, stage 1 one bottleneck of 32 (128 channels)
    "w18_small_v1": {
        "STAGE1": _stage(1, 1, "BOTTLENECK", [1], [32]),
        "STAGE2": _stage(1, 2, "BASIC", [2, 2], [16, 32]),
        "STAGE3": _stage(1, 3, "BASIC", [2, 2, 2], [16, 32, 64]),
        "STAGE4": _stage(1, 4, "BASIC", [2, 2, 2, 2], [16, 32, 64, 128]),
    },
    # W18-small-v2 (timm hrnet_w18_small_v2, mmseg hr18s): 6 fusing modules
    "w18_small_v2": {
        "STAGE1": _stage(1, 1, "BOTTLENECK", [2], [64]),
        "STAGE2": _stage(1, 2, "BASIC", [2, 2], [18, 36]),
        "STAGE3": _stage(3, 3, "BASIC", [2, 2, 2], [18, 36, 72]),
        "STAGE4": _stage(2, 4, "BASIC", [2, 2, 2, 2], [18, 36, 72, 144]),
    },
    **{f"w{c}": _width(c) for c in (18, 30, 32, 40, 44, 48, 64)},
}


def stage_config(name: str) -> Dict[str, Dict]:
    """A deep copy of the stage configuration `name` (a key of `STAGE_CONFIGS`, e.g. ``"w48"``)."""
    if name not in STAGE_CONFIGS:
        raise ValueError(f"unknown HRNet configuration {name!r}; known: {', '.join(STAGE_CONFIGS)}")
    return copy.deepcopy(STAGE_CONFIGS[name])


def branch_channels(config: Dict[str, Dict]) -> List[int]:
    """The channels of the final stage's branches (C, 2C, 4C, 8C for the standard widths)."""
    stage4 = config["STAGE4"]
    expansion = 4 if stage4["BLOCK"] == "BOTTLENECK" else 1
    return [c * expansion for c in stage4["NUM_CHANNELS"]]
