"""Run by tests/fabric/test_cli.py through `torchloom run`: checks the world the CLI made.

The code asks for 3 devices and 32-true; the CLI's --devices and --precision must win (and rank 0 says so).
"""

import argparse

import torch

from torchloom.fabric import Fabric

parser = argparse.ArgumentParser()
parser.add_argument("--world-size", type=int, required=True)
parser.add_argument("--devices", type=int, default=0)  # the script's own option; the CLI's is another
args = parser.parse_args()
assert args.devices == 7, "the script's arguments must pass through unchanged"

fabric = Fabric(accelerator="cpu", devices=3, precision="32-true")
fabric.launch()
assert fabric.world_size == args.world_size, fabric.world_size
total = fabric.all_reduce(torch.tensor(float(fabric.global_rank + 1)), reduce_op="sum")
assert total.item() == args.world_size * (args.world_size + 1) / 2, total
fabric.barrier()
print(
    f"rank={fabric.global_rank} node={fabric.node_rank} world={fabric.world_size} sum={total.item():g} "
    f"precision={fabric.precision.name} device={fabric.device.type}",
    flush=True,
)
