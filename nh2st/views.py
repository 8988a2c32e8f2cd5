"""The dihedral views of a patch: what `nh2st extract --views 8` encodes besides the patch itself.

The released code flips and rotates each target patch at every training step. With a frozen
encoder that augmentation is cached instead: extraction encodes each spot's patch in up to 8 of
the 8 symmetries of the square, and training draws one of them per target spot per epoch
(TRAINING.augment); neighbours and evaluation use the patch as it is (view 0).

View v is `v % 4` quarter turns (counter-clockwise) followed, for v >= 4, by a left-right mirror;
a store with n views (VIEW_COUNTS) holds views 0..n-1: as is, the four rotations, or all eight.
"""

import torch

VIEW_COUNTS = (1, 4, 8)     # the patch as it is; its four rotations; all eight symmetries of the square


def dihedral(patches: torch.Tensor, view: int) -> torch.Tensor:
    """(B, H, W, C) -> the same patches in dihedral view `view` (0..7), contiguous, on their device."""
    if not 0 <= view < 8:
        raise ValueError(f"view {view}: a dihedral view is 0..7")
    out = torch.rot90(patches, view % 4, dims=(1, 2)) if view % 4 else patches
    if view >= 4:
        out = torch.flip(out, dims=(2,))
    return out.contiguous()
