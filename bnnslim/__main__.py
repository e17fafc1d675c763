"""``python -m bnnslim`` (also what ``torchrun -m bnnslim`` runs)."""

from bnnslim.cli.app import main

main()
