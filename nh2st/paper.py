"""The paper's fixed geometry, one place for both stages (no heavy imports)."""

PATCH_SIZE = 224      # patch side in pixels, at PAPER_MPP
PAPER_MPP = 0.5       # µm per pixel of the paper's patches (HEST's ~20x): a patch covers 112 µm
NEIGHBORS_K = 9       # nearest spots by pixel distance, the spot itself first
