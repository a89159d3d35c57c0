"""Fine-tuning on the defender's data: the loop shared by FT, FP (after pruning), NAD (its
teacher) and NC (unlearning). Not a defense itself: it registers nothing. A reported
fine-tuning is the run's resumable loop (``data.resume``); NAD's teacher, not reported,
is trained again on resume."""
from __future__ import annotations

import torch
from torch import nn

from defense.base import DefenseData
from utils.runtime import grad_scaler
from utils.train import make_optimizer, make_scheduler, train_epoch


def fine_tune(model: nn.Module, data: DefenseData, *, epochs: int, lr: float = 0.01, batch_size: int = 128,
              momentum: float = 0.9, weight_decay: float = 5e-4, augment: bool = True,
              lr_scheduler: str = "CosineAnnealingLR", images: torch.Tensor | None = None,
              labels: torch.Tensor | None = None, report: bool = True, epoch_offset: int = 0,
              seed_offset: int = 0) -> nn.Module:
    """SGD with momentum and weight decay, a per-epoch schedule, and the dataset's train
    transform, on ``images``/``labels`` (default: the defender's clean subset). With
    ``report``, each epoch's loss and accuracy go to ``data.report`` as epoch
    ``epoch_offset + e``, and the loop checkpoints and resumes (``data.resume``).
    Returns ``model`` in eval mode."""
    if images is None:
        images, labels = data.tensors()
    optimizer = make_optimizer(model.parameters(), "sgd", lr, momentum, weight_decay)
    scheduler = make_scheduler(optimizer, lr_scheduler, epochs)
    generator = data.generator(seed_offset)
    if report:  # the run's loop: declared to the harness, resumable
        scaler = data.scaler
        loop = data.epochs(epochs, model=model, optimizer=optimizer, scheduler=scheduler, generator=generator)
    else:
        scaler, loop = grad_scaler(data.device, data.amp), range(epochs)
    for epoch in loop:
        stats = train_epoch(model, images, labels, optimizer, batch_size=batch_size, device=data.device,
                            epoch=epoch, augment=data.augment if augment else None, scaler=scaler, amp=data.amp,
                            generator=generator, desc=f"fine-tune {epoch}")
        if scheduler is not None:
            scheduler.step()
        if report:
            data.report(epoch_offset + epoch, model, train_loss=stats["train_epoch_loss_avg_over_batch"],
                        train_acc=stats["train_acc"])
    return model.eval()
