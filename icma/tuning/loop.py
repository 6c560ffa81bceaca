"""The training loop: one readable loop with checkpoints, resume and cancellation.

Data order is a pure function of the seed: micro-batch ``m`` is batch ``m mod per_epoch`` of
epoch ``m div per_epoch``'s order (seeded by seed + epoch), and optimiser step ``s`` takes
micro-batches ``s*accum`` to ``s*accum + accum - 1``. An epoch's order is a permutation of the
examples cut into micro-batches; with ``group_by_length`` (the default) each window of
``GROUP_WINDOW`` micro-batches of that permutation is sorted by length before it is cut, and the
epoch's micro-batches are then shuffled (same generator), so a micro-batch holds examples of
similar length (padding on ChEBI-20 prompts: 20% of a micro-batch's tokens ungrouped, 2.5%
grouped) while each step still draws its micro-batches from all over the epoch. A checkpoint
stores the trainable weights, the optimiser, the schedule and every random generator, so a run
resumed from step ``s`` goes on exactly as if it had never stopped (a test compares the
losses).

The loss is the mean over the answer tokens of a whole optimiser step (not a mean of
micro-batch means, which would weigh short answers up). Where the architecture allows, the
output head runs only on the positions that carry a label: with the loss on answers only that is
a fraction of the sequence, and the head is a large share of a small model's compute.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

from icma.core.errors import IcmaError, InputError
from icma.tuning.batches import IGNORE, Tokenised, collate
from icma.tuning.model import trainable, write_json

log = logging.getLogger(__name__)

#: Architectures whose causal-LM forward is exactly decoder -> output head (no final logit
#: transform), so the head may run on labelled positions only.
HEAD_ONLY_ON_LABELS = {"llama", "mistral", "qwen2", "qwen3", "opt"}

ProgressFn = Callable[[dict], None]
#: Micro-batches per window sorted by length (``group_by_length``): 16 leaves 2.5% padding on
#: ChEBI-20 ICMT prompts (4: 8%, 64: 1%) while every window is still a random draw.
GROUP_WINDOW = 16


class DataParallel(Protocol):
    """This process's part in a data-parallel run (``icma.tuning.ray_train``): which of a
    step's micro-batches it takes, how the step's gradients and figures are summed over the
    processes, and where checkpoints come from and go."""

    rank: int
    world: int

    def share(self, batches: list) -> list: ...

    def reduce(self, params, values: list[float]) -> list[float]:
        """Sum every parameter's gradient over the processes, in place (a missing one counts
        as zeros), and return ``values`` summed over them too."""
        ...

    def restored(self) -> Path | None:
        """A checkpoint to resume from that the run's framework kept (None: none)."""
        ...

    def saved(self, path: Path | None, metrics: dict) -> None:
        """Called by every process after each checkpoint; ``path`` on rank 0 only."""
        ...


class Stopped(IcmaError):
    """Training stopped on request (cancellation or shutdown) after saving a checkpoint."""


@dataclass
class Schedule:
    examples: int
    batch_size: int
    grad_accum: int
    total_steps: int
    warmup_steps: int
    lengths: Sequence[int] | None = None  # set: group micro-batches by length

    @property
    def per_epoch(self) -> int:
        return math.ceil(self.examples / self.batch_size)

    @classmethod
    def plan(cls, examples: int, cfg, lengths: Sequence[int] | None = None) -> "Schedule":
        """``lengths`` (each example's tokens) group micro-batches by length when
        ``cfg.group_by_length``."""
        per_epoch = math.ceil(examples / cfg.batch_size)
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
        warmup = cfg.warmup_for(total)
        if warmup >= total and cfg.warmup_steps is not None:
            raise InputError(f"{warmup} warm-up steps leave none of the {total} steps to train "
                             f"at the full rate", field="warmup_steps")
        grouped = lengths is not None and cfg.group_by_length
        return cls(examples, cfg.batch_size, cfg.grad_accum, total, warmup,
                   list(lengths) if grouped else None)

    def micro_batches(self, step: int, seed: int) -> list[list[int]]:
        """The example indexes of each micro-batch of optimiser step ``step`` (0-based)."""
        orders: dict[int, list[list[int]]] = {}
        out = []
        for m in range(step * self.grad_accum, (step + 1) * self.grad_accum):
            epoch, j = divmod(m, self.per_epoch)
            if epoch not in orders:
                orders[epoch] = self.epoch_order(epoch, seed)
            out.append(orders[epoch][j])
        return out

    def epoch_order(self, epoch: int, seed: int) -> list[list[int]]:
        """The micro-batches of one epoch, in order (see the module's docstring)."""
        import torch

        g = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(self.examples, generator=g).tolist()
        size = self.batch_size
        if self.lengths is None:
            return [perm[lo:lo + size] for lo in range(0, self.examples, size)]
        batches = []
        window = size * GROUP_WINDOW
        for lo in range(0, self.examples, window):
            part = sorted(perm[lo:lo + window], key=lambda i: -self.lengths[i])  # stable
            batches += [part[k:k + size] for k in range(0, len(part), size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def epoch_at(self, step: int) -> float:
        return step * self.grad_accum / self.per_epoch

    def rate(self, step: int) -> float:
        """Linear warm-up, then linear decay to zero (transformers' 'linear' schedule)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # per optimiser step
    tokens: int  # every non-padding token seen (this and earlier sessions)
    wall_s: float  # training time, this and earlier sessions
    resumed_from: int | None = None
    session: dict = field(default_factory=dict)  # throughput of this session alone


def train(net, data: Sequence[Tokenised], cfg, run_dir: Path, *, device: str,
          precision: str, pad_id: int, fingerprint: dict,
          on_progress: ProgressFn | None = None,
          should_stop: Callable[[], bool] | None = None,
          parallel: DataParallel | None = None) -> TrainResult:
    """Train ``net`` on ``data`` to ``cfg``'s end, checkpointing into ``run_dir`` and resuming
    from its latest checkpoint. ``parallel``: one of several processes, each taking its share of
    every step's micro-batches; their gradients are summed before the update, so each update is
    the single-process update (the loss of a step is normalised by the whole step's answer
    tokens either way). The sum is done by hand rather than by a DDP wrapper because the
    head-on-labels forward (``_head_split``) calls the decoder past any wrapper."""
    import torch

    sched = Schedule.plan(len(data), cfg, [len(e.input_ids) for e in data])
    params = trainable(net)
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]  # biases and norms, as Trainer does
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: sched.rate(s))
    autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "float16" else None
    ckpt_root = run_dir / "checkpoints"
    state = {"step": 0, "losses": [], "tokens": 0, "wall_s": 0.0}
    resumed = (parallel.restored() if parallel else None) or latest_checkpoint(ckpt_root)
    writes = parallel is None or parallel.rank == 0  # one process writes the checkpoints
    if resumed is not None:
        state = load_checkpoint(resumed, net, opt, lr_sched, fingerprint, sched, device)
        log.info("resuming from %s (step %d of %d)", resumed.name, state["step"],
                 sched.total_steps)
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
    head_split = _head_split(net, autocast_dtype)
    net.train()
    t_session, tokens_session, start_step = time.perf_counter(), 0, state["step"]
    for step in range(state["step"], sched.total_steps):
        t0 = time.perf_counter()
        batches = [[data[i] for i in idx] for idx in sched.micro_batches(step, cfg.seed)]
        n_label = sum(sum(1 for x in e.labels if x != IGNORE) for b in batches for e in b)
        total, step_tokens = 0.0, 0
        for batch in (parallel.share(batches) if parallel else batches):
            enc = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
            with torch.autocast(device.split(":")[0], dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                loss_sum = _loss_sum(net, enc, head_split)
            loss = loss_sum / max(n_label, 1)
            (scaler.scale(loss) if scaler else loss).backward()
            total += float(loss.detach())
            step_tokens += int(enc["attention_mask"].sum())
        if parallel:
            total, step_tokens = parallel.reduce(params.values(), [total, step_tokens])
        tokens_session += int(step_tokens)
        if scaler:
            scaler.unscale_(opt)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        lr = opt.param_groups[0]["lr"]
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        lr_sched.step()
        done = step + 1
        state["losses"].append(total)
        dt = time.perf_counter() - t0
        state["wall_s"] += dt
        elapsed = time.perf_counter() - t_session
        stopping = bool(should_stop and should_stop())
        if done % cfg.save_steps == 0 or done == sched.total_steps or stopping:
            path = save_checkpoint(ckpt_root, done, net, opt, lr_sched, fingerprint, sched,
                                   {**state, "step": done,
                                    "tokens": state["tokens"] + tokens_session},
                                   cfg.keep_checkpoints) if writes else None
            if parallel:
                parallel.saved(path, {"step": done, "loss": total})
        if on_progress and (done % cfg.log_steps == 0 or done == sched.total_steps):
            rate = (done - start_step) / elapsed
            on_progress({"phase": "training", "step": done, "total_steps": sched.total_steps,
                         "epoch": round(sched.epoch_at(done), 3), "loss": round(total, 5),
                         "learning_rate": lr, "steps_per_s": rate,
                         "tokens_per_s": tokens_session / elapsed,
                         "eta_s": (sched.total_steps - done) / rate if rate else None})
        if stopping and done < sched.total_steps:
            raise Stopped(f"stopped at step {done} of {sched.total_steps}; the checkpoint "
                          f"there resumes it", field="job")
    elapsed = time.perf_counter() - t_session
    steps_now = sched.total_steps - start_step
    return TrainResult(
        sched.total_steps, state["losses"], state["tokens"] + tokens_session, state["wall_s"],
        resumed_from=start_step if resumed is not None else None,
        session={"steps": steps_now, "tokens": tokens_session, "wall_s": elapsed,
                 "steps_per_s": steps_now / elapsed if elapsed else None,
                 "tokens_per_s": tokens_session / elapsed if elapsed else None})


def _head_split(net, dtype=None):
    """(decoder, head) when logits may be computed on labelled positions only, else None.
    With ``dtype`` (autocast's) a frozen head is cast once here rather than by autocast in every
    pass (same products: autocast would cast the same weights to the same type)."""
    import torch

    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    if getattr(base.config, "model_type", None) not in HEAD_ONLY_ON_LABELS:
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if dtype is None or head.weight.requires_grad or not isinstance(head, torch.nn.Linear):
        return decoder, head
    weight = head.weight.detach().to(dtype)
    bias = None if head.bias is None else head.bias.detach().to(dtype)
    return decoder, lambda hidden: torch.nn.functional.linear(hidden, weight, bias)


def _loss_sum(net, enc: dict, head_split):
    """Summed next-token cross-entropy over the labelled positions of one micro-batch.

    No attention mask is passed: ``collate`` pads on the right, and under causal attention a
    real token only sees the tokens before it, never the padding after it (the positions are
    explicit), so the mask would change nothing a loss reads. Without it SDPA takes its causal
    kernel rather than a masked one (measured in `icmt_throughput.md`)."""
    import torch.nn.functional as F

    labels = enc["labels"][:, 1:]
    keep = labels != IGNORE
    if head_split is None:
        logits = net(input_ids=enc["input_ids"], position_ids=enc["position_ids"]).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
    decoder, head = head_split
    hidden = decoder(input_ids=enc["input_ids"],
                     position_ids=enc["position_ids"]).last_hidden_state[:, :-1]
    logits = head(hidden[keep])
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum")


# --- checkpoints -------------------------------------------------------------------------------

def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(root: Path, step: int, net, opt, lr_sched, fingerprint: dict,
                    sched: Schedule, state: dict, keep: int) -> Path:
    """Write ``step-NNNNNNN`` through a temporary folder renamed into place: a crash while
    saving leaves the previous checkpoint as the latest complete one."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({k: v.detach().cpu() for k, v in trainable(net).items()}, tmp / "trainable.pt")
    torch.save({"optimizer": opt.state_dict(), "scheduler": lr_sched.state_dict()},
               tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    write_json(tmp / "state.json", {**state, "step": step, "total_steps": sched.total_steps,
                                    "fingerprint": fingerprint})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("step-*") if p != final)[:-max(keep - 1, 0) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, net, opt, lr_sched, fingerprint: dict, sched: Schedule,
                    device: str) -> dict:
    import torch

    state = json.loads((path / "state.json").read_text())
    if state.get("fingerprint") != fingerprint:
        theirs, ours = state.get("fingerprint") or {}, fingerprint
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise InputError(f"{path.parent} holds checkpoints of a run with other settings "
                         f"({', '.join(diff[:6])} differ); use another name, or restart to "
                         f"discard them", field="name")
    if state.get("total_steps") != sched.total_steps:
        raise InputError(f"{path.parent}: the checkpoints plan {state.get('total_steps')} steps, "
                         f"this run {sched.total_steps}", field="max_steps")
    weights = torch.load(path / "trainable.pt", weights_only=True)
    own = trainable(net)
    if set(weights) != set(own):
        raise InputError(f"{path}: its weights do not belong to this model", field="name")
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v.to(own[k].device))
    opt_state = torch.load(path / "optimizer.pt", weights_only=True)
    opt.load_state_dict(opt_state["optimizer"])
    lr_sched.load_state_dict(opt_state["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
