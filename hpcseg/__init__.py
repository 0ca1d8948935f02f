"""hpcseg: make a cluster's GPUs feel local for medical image segmentation.

Submit an inference server as a batch job (Slurm, PBS or a local process), reach it through an SSH
tunnel, segment images, and send validated image-mask pairs back for fine-tuning.
"""

from __future__ import annotations

__version__ = "0.1.0"
