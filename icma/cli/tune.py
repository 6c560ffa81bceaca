"""``icma tune``: in-context molecule tuning, its flags (one per TuneConfig field) and its
progress display."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    tu = sub.add_parser(
        "tune", help="in-context molecule tuning: LoRA or full fine-tuning on retrieved prompts",
        description="Tune an LLM on ICMA prompts built from a training corpus, each with "
                    "examples retrieved from the corpus itself (its own CID excluded), exactly "
                    "as the worker builds them when serving. Settings come from --config "
                    "(JSON, TOML or YAML) and the flags below, flags winning. The adapter is "
                    "saved into the registry (ICMA_ADAPTERS_DIR) under --name, with a manifest, "
                    "and served by the worker at once. Ctrl-C checkpoints and stops; running "
                    "the same command again resumes.")
    tu.add_argument("--config", type=Path, help="settings file (.json, .toml, .yaml)")
    tu.add_argument("--restart", action="store_true",
                    help="discard this name's checkpoints instead of resuming from them")
    tu.add_argument("--data-dir", type=Path, help="default ICMA_DATA_DIR")
    tu.add_argument("--adapters-dir", type=Path, help="default ICMA_ADAPTERS_DIR")
    tu.add_argument("--json", action="store_true", help="print the manifest as JSON at the end")
    tu.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="local: this process; ray: the same loop on --num-workers Ray Train "
                         "workers (data-parallel; README 'Scaling out')")
    tu.add_argument("--num-workers", type=int, default=2,
                    help="ray: training processes (default 2)")
    tu.add_argument("--use-gpu", action="store_true", help="ray: one GPU per worker")
    tu.add_argument("--ray-address",
                    help="ray: the cluster (HOST:6379, ray://HOST:10001, or auto: the one "
                         "running on this machine; default ICMA_RAY_ADDRESS, then RAY_ADDRESS, "
                         "else a Ray runtime started here)")
    tu.add_argument("--job", help=argparse.SUPPRESS)  # the worker's tune jobs: this job's id
    tu.add_argument("--jobs-db", type=Path, help=argparse.SUPPRESS)
    _config_flags(tu)
    tu.set_defaults(func=cmd_tune)


def _config_flags(parser) -> None:
    """One flag per TuneConfig field, generated from the model (so the two cannot drift)."""
    import typing

    from icma.tuning.config import TuneConfig

    group = parser.add_argument_group("tuning settings (see the README's ICMT section)")
    for name, f in TuneConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = f.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        kind = args[0] if args and typing.get_origin(ann) is not typing.Literal else ann
        default = "" if f.is_required() else f" (default {f.default})"
        help_ = (f.description or "") + default
        kw: dict = {"dest": f"cfg_{name}", "default": argparse.SUPPRESS, "help": help_}
        if typing.get_origin(ann) is typing.Literal or typing.get_origin(kind) is typing.Literal:
            kw["choices"] = typing.get_args(ann if typing.get_origin(ann) is typing.Literal
                                            else kind)
        elif kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float):
            kw["type"] = kind
        elif typing.get_origin(kind) is list:
            kw["nargs"] = "+"
        elif name == "random_walk":
            kw.update(nargs=2, metavar=("SKIP_PROBABILITY", "SEED"))
        group.add_argument(flag, **kw)


def tune_settings(args) -> dict:
    from icma.tuning import read_config_file

    data = read_config_file(args.config) if args.config else {}
    for key, value in vars(args).items():
        if key.startswith("cfg_"):
            name = key[4:]
            if name == "random_walk":  # (typed here: the schema takes no "0.2" for 0.2)
                try:
                    value = {"skip_probability": float(value[0]), "seed": int(value[1])}
                except ValueError:
                    from icma.core.errors import InputError

                    raise InputError(f"takes a skip probability and an integer seed, got "
                                     f"{' '.join(value)}", field="--random-walk") from None
            data[name] = value
    return data


def cmd_tune(args) -> int:
    import threading

    from icma.core.settings import get_settings
    from icma.tuning import Stopped, parse_config, tune
    from icma.jobs.tune import install_stop_signals, run_job

    settings = get_settings()
    data_dir = args.data_dir or settings.data_dir
    adapters_dir = args.adapters_dir or (settings.adapters_path() if not args.data_dir
                                         else Path(data_dir) / "adapters")
    stop = threading.Event()
    restore = install_stop_signals(stop)
    try:
        if args.job:
            from icma.jobs.store import JobStore

            store = JobStore(args.jobs_db or settings.jobs_path())
            try:
                return run_job(store, args.job, settings=settings, data_dir=Path(data_dir),
                               adapters_dir=Path(adapters_dir), stop=stop)
            finally:
                store.close()
        cfg = parse_config(tune_settings(args))
        progress = _TuneProgress(settings.progress)
        try:
            manifest = tune(cfg, settings=settings, data_dir=data_dir, adapters_dir=adapters_dir,
                            on_progress=progress, should_stop=stop.is_set, restart=args.restart,
                            executor=args.executor, num_workers=args.num_workers,
                            use_gpu=args.use_gpu,
                            ray_address=args.ray_address or settings.ray_address)
        except Stopped as exc:
            progress.close()
            print(f"icma: {exc}; run the same command again to resume", file=sys.stderr)
            return 130
        progress.close()
    finally:
        restore()
    t = manifest["training"]
    print(f"adapter {cfg.name!r}: {t['steps']} steps, loss {t['first_loss']:.4f} -> "
          f"{t['final_loss']:.4f}, {t['wall_s']:.0f} s training; saved in "
          f"{Path(adapters_dir if cfg.method == 'lora' else Path(data_dir) / 'models') / cfg.name}",
          file=sys.stderr)
    ev = manifest.get("evaluation")
    if ev and ev.get("metrics"):
        from icma.evaluation.metrics import report_lines

        print(f"evaluation on {ev['n']} records of {ev['split']}:", file=sys.stderr)
        for line in report_lines(ev["metrics"]):
            print("  " + line, file=sys.stderr)
    if args.json:
        print(json.dumps(manifest, indent=2))
    return 0


class _TuneProgress:
    """Phases as log lines, training steps and evaluation as tqdm bars."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.bar_phase = enabled, None, None

    def __call__(self, p: dict) -> None:
        from tqdm import tqdm

        phase = p.get("phase")
        total = p.get("total_steps") if phase == "training" else p.get("total")
        if total and phase in ("training", "evaluating"):
            if self.bar_phase != phase:
                self.close()
                self.bar = tqdm(total=total, desc=phase, unit="step" if phase == "training"
                                else "item", disable=not self.enabled, initial=0)
                self.bar_phase = phase
            done = p.get("step") if phase == "training" else p.get("done")
            self.bar.update(done - self.bar.n)
            if phase == "training":
                self.bar.set_postfix(loss=f"{p['loss']:.4f}", lr=f"{p['learning_rate']:.2e}",
                                     refresh=False)
            return
        if phase in ("checking", "retrieving contexts", "loading model", "saving"):
            self.close()
            extra = {k: v for k, v in p.items() if k != "phase"}
            print(f"icma tune: {phase}" + (f" {extra}" if extra else ""), file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.bar_phase = None, None
