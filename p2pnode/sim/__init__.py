"""The simulator: many virtual nodes in one process over the in-memory transport, on a virtual clock.

:mod:`p2pnode.sim.topology` holds the overlay graphs and the neighbour-limited membership view;
:mod:`p2pnode.sim.core` runs a simulation (``p2pnode simulate``).
"""
