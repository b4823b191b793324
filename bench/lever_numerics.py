"""Does a bench/speed.py lever change kdpipe's numbers? Three kdpipe_online steps (fp32) from the same start with
each lever and without; the largest |Δ| of the student's weights after them, and whether the three losses are
equal. Run it under the reproducible mode's pins, which is where a change would matter (`runtime.reproducible`):

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=COMPATIBLE python bench/lever_numerics.py
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import speed

CHECKED = ("none", "inference_mode", "foreach", "fused", "fewer_copies", "contiguous", "no_fold")


def after_three_steps(x, y, lever: str):
    """(the student's weights flattened, the three losses) after three steps with `lever` ("" for none)."""
    import torch

    from kdpipe.data import batches
    from kdpipe.train import engine

    engine.to_float = batches.to_float  # fewer_copies patches the engine's conversion: undone for every lever
    args = types.SimpleNamespace(side="kdpipe_online" + (f"+{lever}" if lever else ""), precision="fp32", views=4)
    trainers = []
    step = speed.kdpipe_side(x, y, args, {}, hook=lambda trainer, gather: trainers.append(trainer))
    losses = [step().item() for _ in range(3)]
    return torch.cat([p.detach().flatten() for p in trainers[0].modules[0].parameters()]), losses


def main() -> int:
    import torch

    from kdpipe.run.kernels import KNOBS

    torch.set_num_threads(2)
    x, y = speed.load_images(512)
    base, base_losses = after_three_steps(x, y, "")
    rows = {}
    for lever in CHECKED:
        weights, losses = after_three_steps(x, y, lever)
        rows[lever] = {"max_abs_weight_diff": (weights - base).abs().max().item(), "losses_equal": losses == base_losses}
        print(lever, rows[lever], flush=True)
    env = {k: os.environ[k] for k in KNOBS if k in os.environ}
    out = {"command": "python bench/lever_numerics.py", "env": env,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "levers": rows}
    Path("bench/results/lever_numerics.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
