"""SAU's cost, reference against default, on one attack record. A benchmark, not a test.

    python benchmarks/sau_speed.py badnet_digits --record_root /tmp/speedrec --rounds 3
    python benchmarks/sau_speed.py badnet_fashion_mnist --rounds 2 --exact-only

Runs ``--rounds`` rounds of SAU twice in one process, on the same record, clean subset
(the harness's draw, the YAML's ratio) and seed:

(a) a reference loop written here with BackdoorBench's structure (its defense/sau.py):
    every sample through every search step until all are shared (one more no-op step
    after that), f and f_ref re-run on the clean batch at every search step, parameter
    gradients accumulated by the search's backward pass (BackdoorBench calls
    ``loss.backward()`` with both models' parameters trainable), f_ref re-run on x and
    x + delta in the unlearning step, and an evaluation every round with one pass for
    C-Acc, one for ASR and another for RA, in float32;
(b) the project's default: ``defense.sau.SAU.mitigate`` itself (active-set search,
    f_ref's clean labels once, one evaluation pass for ASR and RA, evaluation every
    ``--eval_every`` rounds and after the last).

Both use this project's loss functions (L_sar in log space), so the numbers are equal
where the optimisations are exact. With ``--exact-only``, (b) evaluates every round and
runs in float32 (no --amp) in the default memory layout (``memory_format: contiguous``; SAU's
``auto`` layout, channels_last on the CPU, computes the same function with other rounding,
and the search's sign steps can turn a rounding difference into another perturbation), so
that only number-preserving changes are timed, and every round's C-Acc/ASR/RA are compared
(exit status 1 if any differs). What the layout does to the final numbers over seeds:
``benchmarks/sau_layout.py``.

Printed: per-round seconds of search, unlearning and evaluation for each, their ratio,
both runs' C-Acc/ASR/RA, a torch.profiler table of (b)'s top 10 operators over one more
round, and the FLOPs of one round (measured with torch.utils.flop_counter.FlopCounterMode
over a round of each on the first ``--flop_samples`` clean samples, scaled to the subset;
convolutions and matrix products, forward and backward) with the achieved GFLOP/s.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import defense.sau as sau_module  # noqa: E402
from defense.base import DefenseData, Monitor, clean_indices  # noqa: E402
from defense.sae import SharedAdversarialExamples, adversarial_loss, project, share_loss  # noqa: E402
from defense.sau import SAU, shared_adversarial_risk  # noqa: E402
from utils.config import method_yaml, read_yaml  # noqa: E402
from utils.datasets import load_dataset  # noqa: E402
from utils.metrics import Metrics, evaluate  # noqa: E402
from utils.records import load_record, record_dir  # noqa: E402
from utils.runtime import resolve_device, seed_everything  # noqa: E402
from utils.train import batches, make_optimizer  # noqa: E402

PARTS = ("search", "unlearning", "evaluation")


class Clock:
    """Seconds per (round, part), with device synchronisation around each timed call."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[tuple[int, str], float] = {}
        self.round = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, part: str, fn: Callable, *args, **kwargs):
        self.sync()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.sync()
        key = (self.round, part)
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        return out

    def part(self, r: int, part: str) -> float:
        return self.seconds.get((r, part), 0.0)


# -- (a) the reference: BackdoorBench's structure ----------------------------------------------------


def reference_search(
    sau: SAU, model: nn.Module, model_ref: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """BackdoorBench's Shared_PGD.attack, with this project's loss terms and projection."""
    sae = SharedAdversarialExamples(
        model,
        model_ref,
        bound=sau.trigger_norm,
        step_size=sau.adv_lr,
        steps=sau.adv_steps,
        norm=sau.norm_type,
        init=sau.pgd_init,
        beta_1=sau.beta_1,
        beta_2=sau.beta_2,
        amp=False,
    )
    delta = sae.initial(x).requires_grad_(True)
    for _ in range(sau.adv_steps):
        clean_pred = model(x).argmax(1)  # every step, with a graph, as BackdoorBench
        clean_pred_ref = model_ref(x).argmax(1)
        logits, logits_ref = model(x + delta), model_ref(x + delta)
        pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
        fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
        shared = fooled & fooled_ref & (pred == pred_ref)
        loss = sau.beta_1 * adversarial_loss(logits, logits_ref, y, fooled, fooled_ref) + sau.beta_2 * share_loss(
            logits, logits_ref, shared
        )
        delta.grad = None
        loss.backward()  # also into both models' parameters, as BackdoorBench
        delta = project(
            delta.detach() - sau.adv_lr * delta.grad.sign(), sau.norm_type, sau.trigger_norm
        ).requires_grad_(True)
        if bool(shared.all()):
            break
    return delta.detach()


def reference_unlearning(
    sau: SAU,
    model: nn.Module,
    model_ref: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    delta: torch.Tensor,
) -> None:
    model.train(sau.train_mode)
    logits, logits_adv = model(torch.cat([x, x + delta])).split(len(x))
    model.eval()
    pred_ref_clean = model_ref(x).argmax(1)
    pred_ref_adv = model_ref(x + delta).argmax(1)
    loss = (
        sau.lmd_1 * F.cross_entropy(logits, y)
        + sau.lmd_2 * F.cross_entropy(logits_adv, y)
        + sau.lmd_3 * shared_adversarial_risk(logits_adv, pred_ref_adv, pred_ref_clean, y)
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@torch.no_grad()
def reference_evaluation(model: nn.Module, test, bd_test, device: torch.device, batch_size: int = 256) -> Metrics:
    """Three passes (clean, backdoor for ASR, backdoor again for RA), as BackdoorBench's eval_step."""
    model.eval()

    def run(images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        correct, loss, n = 0, 0.0, 0
        for xb, yb in batches(images, labels, batch_size=batch_size, device=device):
            out = model(xb)
            correct += int((out.argmax(1) == yb).sum())
            loss += float(F.cross_entropy(out, yb, reduction="sum"))
            n += len(yb)
        return correct / max(n, 1), loss / max(n, 1)

    acc, loss = run(test.images, test.labels)
    asr, bd_loss = run(bd_test.images, bd_test.labels)
    ra, ra_loss = run(bd_test.images, bd_test.original_labels)
    return Metrics(acc, asr, ra, loss, bd_loss, ra_loss)


def reference_rounds(
    sau: SAU,
    model: nn.Module,
    data: DefenseData,
    rounds: int,
    clock: Clock,
    evaluate_fn,
) -> dict[int, Metrics]:
    model_ref = copy.deepcopy(model).eval()  # trainable parameters, as BackdoorBench's copy
    model.eval()
    optimizer = make_optimizer(model.parameters(), "adam", sau.lr)
    generator = data.generator()
    x_all, y_all = data.tensors()
    metrics = {}
    for r in range(rounds):
        clock.round = r
        for idx, y in batches(
            torch.arange(len(y_all)),
            y_all,
            batch_size=sau.batch_size,
            device=data.device,
            shuffle=True,
            generator=generator,
        ):
            x = x_all[idx]
            delta = clock.timed("search", reference_search, sau, model, model_ref, x, y)
            for _ in range(sau.outer_steps):
                clock.timed("unlearning", reference_unlearning, sau, model, model_ref, optimizer, x, y, delta)
        metrics[r] = clock.timed("evaluation", evaluate_fn, model)
    return metrics


# -- (b) the project's default, timed from outside -----------------------------------------------------


def default_rounds(
    sau: SAU,
    model: nn.Module,
    data: DefenseData,
    rounds: int,
    clock: Clock,
    evaluate_fn,
    eval_every: int,
    memory_format: str = "auto",
) -> dict[int, Metrics]:
    metrics: dict[int, Metrics] = {}

    class TimedSAE(SharedAdversarialExamples):
        def search(self, *args, **kwargs):
            return clock.timed("search", super().search, *args, **kwargs)

        def reference_predictions(self, *args, **kwargs):
            return clock.timed("search", super().reference_predictions, *args, **kwargs)

    class TimedSAU(SAU):
        def unlearning_step(self, *args, **kwargs):
            return clock.timed("unlearning", super().unlearning_step, *args, **kwargs)

    class TimedMonitor(Monitor):
        def report(self, epoch: int, model: nn.Module, **values: float) -> None:
            clock.round = epoch
            super().report(epoch, model, **values)
            clock.round = epoch + 1

    def measured(m: nn.Module) -> Metrics:
        out = clock.timed("evaluation", evaluate_fn, m)
        metrics[clock.round] = out
        return out

    timed_sau = TimedSAU(**{**sau.hyperparameters(), "epochs": rounds, "memory_format": memory_format})
    data.monitor = TimedMonitor(measured, eval_every, rounds - 1)
    original, sau_module.SharedAdversarialExamples = sau_module.SharedAdversarialExamples, TimedSAE
    try:
        clock.round = 0
        timed_sau.mitigate(model, data)
    finally:
        sau_module.SharedAdversarialExamples = original
        data.monitor = None
    return metrics


def round_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("record", help="attack record (a folder of --record_root)")
    parser.add_argument("--record_root", default="record")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--eval_every", type=int, default=5, help="(b)'s evaluation schedule (the default's)")
    parser.add_argument(
        "--exact-only",
        dest="exact_only",
        action="store_true",
        help="(b) in float32 and evaluated every round; compare every round's metrics",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--data_root", default=None, help="default: the record's, else ./data")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled round")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP-counted rounds")
    parser.add_argument(
        "--flop_samples",
        type=int,
        default=512,
        help="clean samples of the FLOP-counted rounds (FlopCounterMode's bookkeeping over a whole round of a "
        "large clean subset needs tens of GB); the count is scaled to the whole subset",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    record = load_record(record_dir(Path(args.record_root), args.record))
    yaml_path = method_yaml("defense", "sau", record.clean_data)
    options = read_yaml(Path(yaml_path)) if yaml_path else {}
    ratio = options.pop("ratio", 0.05)
    sau = SAU(**{k: v for k, v in options.items() if k in SAU().hyperparameters()})
    device = resolve_device(args.device)
    where = args.data_root or record.config.get("data_root")
    data = load_dataset(
        record.clean_data,
        where if isinstance(where, str) and Path(where).is_dir() else "data",
        img_size=record.config.get("img_size"),
    )
    idx = clean_indices(data.train.labels, record.poison_indices, ratio, args.seed)
    amp = False  # the default (mixed precision is opt-in, and a no-op on the CPU)
    eval_every = 1 if args.exact_only else args.eval_every

    def defender(limit: int | None = None) -> DefenseData:
        d = DefenseData(data.train.subset(idx[:limit]), data.info, device, amp, args.seed)
        d.tensors()
        return d

    backdoored = record.build_model().to(device).eval()
    print(
        f"record {args.record}: {record.model_name} on {record.clean_data}, {len(idx)} clean samples (ratio "
        f"{ratio}), batch {sau.batch_size}, {args.rounds} rounds, adv_steps {sau.adv_steps}, device {device}, "
        f"torch threads {torch.get_num_threads()}; test {len(data.test)} + backdoor test {len(record.bd_test)}"
    )
    print(
        f"(b): the default, amp {amp}, evaluation every {eval_every} rounds and the last, memory_format "
        + (
            "contiguous (channels_last changes rounding, so it is left out here)"
            if args.exact_only
            else sau.memory_format
        )
    )

    clocks = {"a": Clock(device), "b": Clock(device)}
    metrics = {}
    seed_everything(args.seed)
    metrics["a"] = reference_rounds(
        sau,
        copy.deepcopy(backdoored),
        defender(),
        args.rounds,
        clocks["a"],
        lambda m: reference_evaluation(m, data.test, record.bd_test, device),
    )
    seed_everything(args.seed)
    metrics["b"] = default_rounds(
        sau,
        copy.deepcopy(backdoored),
        defender(),
        args.rounds,
        clocks["b"],
        lambda m: evaluate(m, data.test, record.bd_test, device=device),
        eval_every,
        # the default layout, as (a) runs, for bit-for-bit comparable numbers
        memory_format="contiguous" if args.exact_only else sau.memory_format,
    )

    print(
        f"\n{'round':>5} | {'(a) search':>10} {'unlearn':>8} {'eval':>6} {'total':>7} | {'(b) search':>10} "
        f"{'unlearn':>8} {'eval':>6} {'total':>7} | {'a/b':>5}"
    )
    totals = {k: {p: 0.0 for p in PARTS} for k in clocks}
    for r in range(args.rounds):
        cells = []
        for k, clock in clocks.items():
            parts = [clock.part(r, p) for p in PARTS]
            for p, v in zip(PARTS, parts):
                totals[k][p] += v
            cells.append(f"{parts[0]:10.2f} {parts[1]:8.2f} {parts[2]:6.2f} {sum(parts):7.2f}")
        ratio_r = sum(clocks["a"].part(r, p) for p in PARTS) / max(sum(clocks["b"].part(r, p) for p in PARTS), 1e-9)
        print(f"{r:>5} | {cells[0]} | {cells[1]} | {ratio_r:5.2f}")
    ta, tb = (sum(totals[k].values()) for k in ("a", "b"))
    print(
        f"{'all':>5} | {totals['a']['search']:10.2f} {totals['a']['unlearning']:8.2f} "
        f"{totals['a']['evaluation']:6.2f} {ta:7.2f} | {totals['b']['search']:10.2f} "
        f"{totals['b']['unlearning']:8.2f} {totals['b']['evaluation']:6.2f} {tb:7.2f} | {ta / max(tb, 1e-9):5.2f}"
    )
    print("ratios a/b: " + ", ".join(f"{p} {totals['a'][p] / max(totals['b'][p], 1e-9):.2f}" for p in PARTS))

    print("\nround | (a) C-Acc    ASR     RA | (b) C-Acc    ASR     RA")
    differ = False
    for r in range(args.rounds):
        a, b = metrics["a"][r], metrics["b"].get(r)
        same = b is not None and (a.clean_acc, a.asr, a.ra) == (b.clean_acc, b.asr, b.ra)
        differ |= b is not None and not same
        shown_b = "   (not evaluated)" if b is None else f"{b.clean_acc:10.4f} {b.asr:6.4f} {b.ra:6.4f}"
        print(
            f"{r:>5} | {a.clean_acc:9.4f} {a.asr:6.4f} {a.ra:6.4f} | {shown_b}"
            + ("" if b is None or same else "  DIFFERENT")
        )

    if args.flops:
        # FLOPs of one round (a fresh copy of the backdoored model, one round each), and GFLOP/s
        flops = {}
        counted = min(args.flop_samples, len(idx))
        for k in ("a", "b"):
            seed_everything(args.seed)
            m, d, c = copy.deepcopy(backdoored), defender(counted), Clock(device)
            if k == "a":
                flops[k] = round_flops(lambda: reference_rounds(sau, m, d, 1, c, lambda _: None))
            else:
                nan = Metrics(*[float("nan")] * 6)
                flops[k] = round_flops(lambda: default_rounds(sau, m, d, 1, c, lambda _: nan, 1))
            flops[k] = flops[k] * len(idx) / counted  # scaled from the counted samples to the whole subset
        with torch.no_grad():
            per_sample = round_flops(lambda: backdoored(data.train.images[:64].to(device).float() / 255)) / 64
        n_eval = len(data.test) + len(record.bd_test)
        print(
            f"\nmodel forward: {per_sample / 1e6:.2f} MFLOP a sample; one evaluation: (a) "
            f"{(n_eval + len(record.bd_test)) * per_sample / 1e9:.2f} GFLOP, "
            f"(b) {n_eval * per_sample / 1e9:.2f} GFLOP"
        )
        for k in ("a", "b"):
            work = sum(clocks[k].part(r, p) for r in range(args.rounds) for p in ("search", "unlearning")) / args.rounds
            print(
                f"({k}) one round's search + unlearning: {flops[k] / 1e9:.2f} GFLOP "
                f"(= {flops[k] / per_sample / len(idx):.1f} forward passes a clean sample), "
                f"{flops[k] / 1e9 / max(work, 1e-9):.1f} GFLOP/s achieved"
            )

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        seed_everything(args.seed)
        m, d, c = copy.deepcopy(backdoored), defender(), Clock(device)
        with profile(activities=activities) as prof:
            default_rounds(sau, m, d, 1, c, lambda mm: evaluate(mm, data.test, record.bd_test, device=device), 1)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n(b), one round with its evaluation, top 10 operators by {key}:")
        print(prof.key_averages().table(sort_by=key, row_limit=10))
    if differ:
        print("the runs' metrics differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
