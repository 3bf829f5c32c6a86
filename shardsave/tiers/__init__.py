"""The fast tier: node-local checkpoints beside the durable directory (multi-level
checkpointing, as LLNL's SCR and Orbax's multi-tier checkpointing do).

topology.py (pure: nodes, partners, XOR groups), files.py (pure: the fast tier's file
names), manifest.py (pure: what a fast-tier checkpoint records beside its index), and the
modules that save to it, protect it, drain it to the durable tier and restart from it.
"""
