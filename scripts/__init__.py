"""Helper scripts for running and testing the stack on loopback."""
