"""Where finished snapshots go: the Pushgateway and Pramathus."""
