"""`python -m lrem.cli ...` (and `torchrun -m lrem.cli ...`): the `lrem` command."""
from lrem.cli import main

main()
