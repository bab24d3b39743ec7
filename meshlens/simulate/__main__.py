"""``python -m meshlens.simulate --out data/samples --seed 7``: see :mod:`meshlens.cli.simulate`."""

from meshlens.cli.simulate import main

if __name__ == "__main__":
    main()
