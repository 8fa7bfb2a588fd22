"""``python -m loratool`` runs the command line."""

from loratool.cli.main import main

main()
