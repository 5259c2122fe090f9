"""Both callbacks configured from YAML with ``LightningCLI``: no training code of its own.

``cli_config.yaml`` lists ``lightning_rank.RankMonitor`` and ``lightning_rank.RankCompression`` under
``trainer.callbacks``; any of their arguments can be changed there or on the command line.

Run::

    .venv/bin/python examples/cli.py fit --config examples/cli_config.yaml
    .venv/bin/python examples/cli.py fit --config examples/cli_config.yaml --trainer.max_epochs=5
    .venv/bin/python examples/cli.py fit --help        # every option, the callbacks' included
"""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.cli import ArgsType, LightningCLI

from digits import DigitsDataModule, DigitsViT

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def main(args: ArgsType = None) -> LightningCLI:
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    return LightningCLI(DigitsViT, DigitsDataModule, args=args)


if __name__ == "__main__":
    main()
