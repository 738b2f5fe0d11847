"""``python -m hesscli``: the command line (also how torchrun starts it: ``torchrun ... -m hesscli``)."""

from hesscli.cli import run

if __name__ == "__main__":
    run()
