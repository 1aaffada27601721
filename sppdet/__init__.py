"""sppdet: SPPnet object detection (He et al., ECCV 2014) on PyTorch."""

import os as _os

# Intel MKL's matrix products give the same bits whatever the number of threads only in
# its strict reproducibility mode; without it the fine-tuned fc layers (and so the whole
# detector) differed in the last bits between 1 and 2 threads.  MKL reads this once, at its
# first call: it takes effect when sppdet is imported before any torch matrix product runs.
# A value the user set is kept.  It does not make results equal across CPU kinds or builds.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
