"""Save: the five-step collective save (protocol.py) and the parts it runs on every rank
(layout, staging, writer, replicas) and on the coordinator (commit)."""
