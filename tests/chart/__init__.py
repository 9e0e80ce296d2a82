"""Unit-level tests of the Helm chart: rendered by the real Helm engine, no servers."""
