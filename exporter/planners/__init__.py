"""Pure decisions of a cycle: plain data in, plain data out."""
