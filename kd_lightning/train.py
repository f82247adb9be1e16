"""`python -m kd_lightning.train` is kd-train (kd_lightning.cli.train), e.g. under torchrun."""

from kd_lightning.cli.train import main

if __name__ == "__main__":
    main()
