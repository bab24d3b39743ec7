"""``python -m meshlens.simulate --out data/samples --seed 7``: see :mod:`meshlens.cli_simulate`."""

from meshlens.cli_simulate import main

if __name__ == "__main__":
    main()
