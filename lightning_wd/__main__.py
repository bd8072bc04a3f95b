"""``python -m lightning_wd``: the ``lightning-wd`` command line (see ``lightning_wd._cli``)."""

from lightning_wd._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
