"""The session wing: one session between two nodes, in either role."""
