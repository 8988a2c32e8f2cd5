"""nh2st: NH²2ST spatial gene-expression prediction from H&E slides, on cached features."""

__version__ = "0.1.0"
