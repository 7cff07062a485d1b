"""``python -m embedstore`` runs the CLI."""
from embedstore.cli.main import main

main()
