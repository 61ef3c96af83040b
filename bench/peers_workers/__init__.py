"""Helpers of ``bench/peers.py``: the trivial worker, our equivalents of it, and the peer drivers."""
