"""``python -m meshlens.cli ...``: the same as the ``meshlens`` command."""

from meshlens.cli import main

main()
