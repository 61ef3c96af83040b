"""Example plug-in services shipped with microkernel (used by the demo and the docs)."""
