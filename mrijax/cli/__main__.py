"""`python -m mrijax.cli COMMAND ...`, the same as the `mrijax` console script."""
from mrijax.cli.main import main

main()
