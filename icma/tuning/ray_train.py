"""``icma tune --executor ray``: the same training loop on N processes under Ray Train's
``TorchTrainer`` (torch.distributed: gloo on CPUs, NCCL on GPUs).

The driver (``icma.tuning.run``) checks everything and builds the training set as a local run
does; each Ray Train worker loads the base model, and ``icma.tuning.loop.train`` runs with a
``RayParallel``: worker r takes micro-batches r, r+N, ... of every optimiser step and the
gradients are summed before the update, so a step is the single-process step (the tests
compare the losses of a 1-process and a 2-worker run). Rank 0 writes the loop's own checkpoints
and hands each to Ray (``ray.train.report``), which keeps them under the run's folder; a run
started again resumes from Ray's latest, else from the run folder's. The driver then loads the
final checkpoint's weights and saves the adapter and its manifest exactly as a local run does.

On a cluster the base model's folder and the run folder (``<data_dir>/tuning/<name>``) must be
at the same path on every node, i.e. on shared storage, like the data directory for
``--executor ray`` translation: a worker that dies is restarted from the latest checkpoint Ray
holds, and the command run again resumes from the run folder's checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from icma.core.errors import UnavailableError
from icma.tuning.loop import TrainResult

log = logging.getLogger(__name__)


class RayParallel:
    """``icma.tuning.loop.DataParallel`` inside a Ray Train worker."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def share(self, batches: list) -> list:
        return batches[self.rank::self.world]

    def reduce(self, params, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        for p in params:
            if p.grad is None:  # no micro-batch here this step: it adds nothing
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        figures = torch.tensor(values, dtype=torch.float64,
                               device=next(iter(params)).grad.device if params else "cpu")
        dist.all_reduce(figures, op=dist.ReduceOp.SUM)
        return figures.tolist()

    def restored(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        # (a copy on this node, wherever the run's storage is)
        return Path(checkpoint.to_directory()) if checkpoint is not None else None

    def saved(self, path: Path | None, metrics: dict) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path else None
        ray.train.report(metrics, checkpoint=checkpoint)


def _worker(config: dict) -> None:
    """One Ray Train worker: the model, then the loop with this worker's share."""
    import ray.train
    import torch

    from icma.tuning.loop import train
    from icma.tuning.model import load_model

    ctx = ray.train.get_context()
    parallel = RayParallel(ctx.get_world_rank(), ctx.get_world_size())
    cfg = config["cfg"]
    device = str(ray.train.torch.get_device()) if config["use_gpu"] else "cpu"
    torch.manual_seed(cfg.seed)  # LoRA's initialisation: the same on every worker
    net = load_model(cfg, config["base_path"], device, config["precision"])
    report = (lambda p: log.warning("rank 0: %s", json.dumps(p))) if parallel.rank == 0 \
        else None
    result = train(net, config["data"], cfg, Path(config["run_dir"]), device=device,
                   precision=config["precision"], pad_id=config["pad_id"],
                   fingerprint=config["fingerprint"], on_progress=report, parallel=parallel)
    # The last report carries a checkpoint (Ray keeps the metrics of the latest checkpointed
    # report only): the final weights again, with the loop's result beside them.
    final = None
    if parallel.rank == 0:
        import shutil
        import tempfile

        from icma.tuning.loop import latest_checkpoint

        final = Path(tempfile.mkdtemp(prefix="icma-final-"))
        shutil.copy(latest_checkpoint(Path(config["run_dir"]) / "checkpoints") / "trainable.pt",
                    final / "trainable.pt")
    try:
        ray.train.report({"result": json.dumps(dataclasses.asdict(result))},
                         checkpoint=ray.train.Checkpoint.from_directory(str(final))
                         if final else None)
    finally:
        if final:
            shutil.rmtree(final, ignore_errors=True)


def train_on_ray(data, cfg, run_dir: Path, *, base_path: str, precision: str, pad_id: int,
                 fingerprint: dict, num_workers: int, use_gpu: bool,
                 ray_address: str | None) -> tuple[TrainResult, dict]:
    """Train on ``num_workers`` Ray Train workers; returns the loop's result and the trained
    weights (the final checkpoint's ``trainable.pt``)."""
    import torch

    from icma.core.ray_cluster import connect

    connect(ray_address)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = (run_dir / "ray").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg, "data": list(data), "run_dir": str(run_dir.resolve()),
                           "base_path": base_path, "precision": precision, "pad_id": pad_id,
                           "fingerprint": fingerprint, "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        # A worker that dies restarts the group from the latest checkpoint Ray holds.
        run_config=RunConfig(name="train", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=2)))
    try:
        out = trainer.fit()
    except Exception as exc:
        cause = exc
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        raise UnavailableError(f"the Ray Train run failed: {type(cause).__name__}: "
                               f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''}",
                               field="executor") from None
    if out.checkpoint is None or "result" not in (out.metrics or {}):
        raise UnavailableError(f"the Ray Train run ended without its final checkpoint "
                               f"(checkpoint {out.checkpoint}, metrics "
                               f"{sorted(out.metrics or {})})", field="executor")
    weights = torch.load(Path(out.checkpoint.to_directory()) / "trainable.pt",
                         weights_only=True)
    return TrainResult(**json.loads(out.metrics["result"])), weights
