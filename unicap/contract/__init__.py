"""The data contract: one module per table every job writes and every reader imports."""
