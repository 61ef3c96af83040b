"""microkernel: a microkernel-style process supervisor for ML workloads.

The daemon (``microkerneld``) lives in ``microkernel.runtime``; the client in
``microkernel.client``; the command line in ``microkernel.cli``. This package never imports
torch.
"""

__version__ = "0.1.0"
