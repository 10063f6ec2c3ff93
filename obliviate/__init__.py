"""The `obliviate` command line: the gateway's commands (server/cli.py) and the layers above it
(`eval`, evaluation/cli.py). It is the only module that imports both; lower layers never import
upper ones."""
