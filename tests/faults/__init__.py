"""Helpers for the fault tests: scripts run under mpiexec, and how to launch them."""
