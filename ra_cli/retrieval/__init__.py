"""Retrieval attention at decode: a static set on the device, the rest found by index search on the
CPU and merged exactly by log-sum-exp (`layer`), and the attention cache of a stored context for
each attention mode (`modes`)."""
