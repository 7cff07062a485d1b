"""``python -m embedstore`` runs the CLI."""
from embedstore.cli import main

main()
