"""The training loop of the models tbpw trains for itself (the tiny test llama, the benchmark model).

Batches are fixed-length windows taken in a seeded order; the learning rate warms up linearly, then follows
a cosine down to a tenth of its peak; gradients are clipped at norm 1. Both models share it, so a change
here reaches both (and changes the committed test model only when its script is run again).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


def train_steps(model, windows, order, opt, *, steps: int, batch: int, warmup: int,
                log: Callable[[str], None] = print) -> tuple[float, float]:
    """Run `steps` optimizer steps of `batch` windows each; returns (seconds, the last step's loss)."""
    import torch

    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    device = next(model.parameters()).device
    model.train()
    start = time.monotonic()
    loss = None
    for step in range(steps):
        pick = order[(step * batch + torch.arange(batch)) % len(windows)]
        rows = windows[pick].to(device)
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {loss.item():.3f}  {time.monotonic() - start:6.1f} s")
    return time.monotonic() - start, float(loss.item()) if loss is not None else float("nan")


def heldout_perplexity(model, ids, seq: int, max_windows: int) -> tuple[float, int]:
    """(perplexity, windows used) of `model` on up to `max_windows` windows of `seq` tokens of `ids`."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    windows = ids[: len(ids) // seq * seq].view(-1, seq)[:max_windows].to(device)
    with torch.no_grad():
        nll = sum(model(input_ids=w[None], labels=w[None]).loss.item() for w in windows) / len(windows)
    return math.exp(nll), len(windows)
