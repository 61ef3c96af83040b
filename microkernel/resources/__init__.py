"""Resource accounting and enforcement: host memory budgets, CUDA device leases, CPU budgets.

Pure bookkeeping and OS-facing helpers; the supervisor and the kernel's handlers wire them in.
Nothing here imports torch or initialises CUDA.
"""
