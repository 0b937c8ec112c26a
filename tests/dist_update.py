"""One SFT update, run either as one process or under `torchrun --nproc_per_node 2` (gloo on CPU).

Writes the updated parameters to OUT/weights.pt (main process). The test compares the two.
"""
import sys
from pathlib import Path

import torch

from rlbook.sft import SFT
from rlbook.train import train

out = Path(sys.argv[1])
cfg = SFT.config(steps=1, batch_size=16, lr=0.05, warmup_steps=0, eval_n=4, out=str(out), device="cpu",
                 progress=False)
run = train(cfg, SFT, make_optimizer=lambda params, c: torch.optim.SGD(params, lr=c.lr))
if run.accelerator.is_main_process:
    torch.save({k: v.detach().cpu() for k, v in run.model.state_dict().items()}, out / "weights.pt")
    print("world", run.world)
