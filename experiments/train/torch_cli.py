"""The torch path of the training CLI (``--framework torch``): the same flags, data, batch
order and outputs (``config.json``, ``metrics.jsonl``, ``summary.json``) with a
``revtorch.models`` model, ``revtorch.train``'s AdamW + warm-up/cosine schedule and
``torch.save`` checkpoints.

``checkpoints/step_<N>.pt`` hold the config, the step, the data position and the state of the
model, optimizer, scheduler, GradScaler (float16) and torch's RNG (dropout); each is written
to a temporary file and renamed (``os.replace``), the last two are kept. The batch of step s
is a function of (seed, s) (``data.batch_indices``; MLM masking from a generator seeded with
(seed, s)), so ``--resume`` ends with the parameters of an unbroken run, bit for bit on CPU.

Several processes: launch with ``torchrun`` (or ``python -m torch.distributed.run``) and
``--parallel dp`` (``DistributedDataParallel``) or ``--parallel fsdp`` (FSDP2
``fully_shard`` on every module of a ``ModuleList``, the reversible halves F and G
included, then on the model). The process group is initialised from torchrun's environment
variables: gloo on CPU, NCCL on CUDA (process ``LOCAL_RANK`` on device ``LOCAL_RANK``).
Every process builds the same global batch of step s and takes its contiguous shard
(``--batch-size`` is the global batch, divisible by the number of processes); losses and
evaluation sums are all-reduced, so the metrics are the global batch's. Only rank 0 writes
``config.json``, ``metrics.jsonl``, checkpoints (FSDP: gathered to full tensors) and
``summary.json``. A checkpoint holds every rank's RNG state; ``--resume`` needs the same
number of processes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
import tempfile
import time

import numpy as np

from experiments.common import atomic_write_json
from experiments.train import data as data_lib
from experiments.train.config import (ConfigError, TrainingError, check_resume, load_dataset,
                                      model_overrides, rewrite_metrics, task_of)

_CKPT = re.compile(r"^step_(\d{8})\.pt$")


def environment() -> dict:
    """Versions and machine."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}


# ---------------------------------------------------------------------- processes

_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_LAUNCH = ("torchrun --nproc_per_node=N -m experiments.train --framework torch "
           "--parallel {} ... (or python -m torch.distributed.run)")


def launched() -> dict | None:
    """``{"rank", "world", "local_rank"}`` from torchrun's environment variables; None when
    this process was not started by torchrun."""
    if not all(k in os.environ for k in _TORCHRUN):
        return None
    return {"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
            "local_rank": int(os.environ["LOCAL_RANK"])}


def check_parallel(cfg: dict, launch: dict | None) -> None:
    """``--parallel`` against the launch (before any process group exists)."""
    par, world = cfg["parallel"], 1 if launch is None else launch["world"]
    if par == "none":
        if world > 1:
            raise ConfigError(f"torchrun started {world} processes but --parallel is none: "
                              "pass --parallel dp (DistributedDataParallel) or --parallel "
                              "fsdp (FSDP2), or start one process")
        return
    if launch is None:
        raise ConfigError(f"--parallel {par} with --framework torch runs one process per "
                          f"device, started by torchrun: {_LAUNCH.format(par)}")
    if cfg["devices"] is not None and cfg["devices"] != world:
        raise ConfigError(f"--devices {cfg['devices']} but torchrun started {world} processes")
    if cfg["batch_size"] % world:
        raise ConfigError(f"--batch-size {cfg['batch_size']} (the global batch) is not "
                          f"divisible by the {world} processes")


class _Group:
    """This process's place: rank, world size, device, and the collectives the loop needs
    (no-ops for one process)."""

    def __init__(self, launch: dict | None) -> None:
        import torch
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = (0, 1) if launch is None else (launch["rank"], launch["world"])
        cuda = torch.cuda.is_available()
        local = 0 if launch is None else launch["local_rank"]
        self.device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if launch is not None and not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if cuda else "gloo")

    @property
    def active(self) -> bool:
        return self.world > 1 or self.dist.is_initialized()

    def shard(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n``."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        if not self.active:
            return list(values)
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        """Every rank's ``obj``, in rank order."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier()


def leave(rc: int) -> None:
    """End the CLI process. Under torchrun: a barrier (after success), flushed output, then
    ``os._exit``: tearing down a gloo process group can deadlock at exit (its destructor
    joins a thread that needs the GIL; tests/revtorch/test_ddp.py)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        if rc == 0:
            dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def shard_model(model):
    """FSDP2: ``fully_shard`` every module held in an ``nn.ModuleList`` (innermost first:
    the reversible halves F and G, the standard blocks), then the model."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    for lst in reversed(lists):
        for sub in lst:
            fully_shard(sub)
    fully_shard(model)
    return model


def _overrides(cfg: dict, dataset: data_lib.Dataset | None) -> dict:
    import torch

    kw: dict = {}
    if cfg["dtype"] in ("bfloat16", "float16"):
        kw["dtype"] = getattr(torch, cfg["dtype"])
    elif cfg["dtype"] == "float64":
        kw["param_dtype"] = torch.float64
    return {**kw, **model_overrides(cfg, dataset)}


def check_config(cfg: dict) -> data_lib.Dataset:
    """Validate model, dataset and settings (the model is built on the meta device);
    returns the dataset."""
    import torch

    import revtorch

    if cfg["model"] not in revtorch.models.names():
        raise ConfigError(f"unknown model {cfg['model']!r}; known: "
                          f"{', '.join(revtorch.models.names())}")
    if cfg["data"] not in data_lib.DATASETS:
        raise data_lib.DataError(f"unknown dataset {cfg['data']!r}; known: "
                                 f"{', '.join(data_lib.DATASETS)}")
    task = task_of(cfg["model"])
    if (task == "mlm") != (cfg["data"] in data_lib.TEXT_DATASETS):
        kind = "a text" if task == "mlm" else "an image"
        raise ConfigError(f"model {cfg['model']} needs {kind} dataset, got {cfg['data']!r}")
    for key in ("steps", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {cfg[key]}")
    try:
        with torch.device("meta"):
            mc = revtorch.models.build(cfg["model"], mode=cfg["mode"],
                                       **_overrides(cfg, None)).config
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model {cfg['model']}: {e}") from None
    return load_dataset(cfg, mc)


def checkpoints(out: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the checkpoints in ``out``, oldest first."""
    d = os.path.join(out, "checkpoints")
    if not os.path.isdir(d):
        return []
    found = [(int(m.group(1)), os.path.join(d, n)) for n in os.listdir(d)
             if (m := _CKPT.match(n))]
    return sorted(found)


def _save(path: str, payload: dict) -> None:
    import torch

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load(path: str) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a corrupt or foreign file)
        raise ConfigError(f"--resume: cannot read checkpoint {path} ({e})") from None


def final_state_dict(out: str) -> dict:
    """The model ``state_dict`` of the latest checkpoint in ``out``."""
    found = checkpoints(out)
    if not found:
        raise FileNotFoundError(f"no torch checkpoints in {out}")
    return _load(found[-1][1])["model"]


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (a generator per (seed, purpose, index))."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def train(args, cfg: dict, out: str) -> dict:
    """Run the torch path: every check (``check_resume`` included) on every process before
    anything is written."""
    launch = launched()
    check_parallel(cfg, launch)
    if "jax" not in sys.modules:  # the data's resize (jax.image) stays off the GPU torch uses
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    group = _Group(launch)
    check_resume(cfg, out, args.resume)
    dataset = check_config(cfg)

    import torch
    from tqdm import tqdm

    import revtorch
    from revtorch import mlm
    from revtorch import train as T

    task, mode, par = task_of(cfg["model"]), cfg["mode"], cfg["parallel"]
    lead = group.rank == 0
    torch.manual_seed(cfg["seed"])
    model = revtorch.models.build(cfg["model"], mode=mode, **_overrides(cfg, dataset))
    model.to(group.device)
    if group.rank:  # the same initial model everywhere, dropout of its own on each rank
        torch.manual_seed(_seed(cfg["seed"], 4, group.rank))
    if par == "fsdp":
        net = shard_model(model)
    elif par == "dp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [group.device.index] if group.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    else:
        net = model
    clip = cfg["clip"] or None
    optimizer, scheduler = T.make_optimizer(
        model, cfg["lr"], cfg["steps"], warmup_steps=cfg["warmup"],
        weight_decay=cfg["weight_decay"], clip_norm=clip)
    scaler = (torch.amp.GradScaler(group.device.type) if cfg["dtype"] == "float16"
              else None)
    in_dtype = torch.float64 if cfg["dtype"] == "float64" else torch.float32

    ckpt_dir = os.path.join(out, "checkpoints")
    metrics_path = os.path.join(out, "metrics.jsonl")
    start = 0
    found = checkpoints(out)
    if args.resume and found:
        start, path = found[-1]
        ck = _load(path)
        saved = ck.get("config") if isinstance(ck, dict) else None
        if not isinstance(saved, dict) or saved.get("model") != cfg["model"]:
            other = saved.get("model") if isinstance(saved, dict) else None
            raise ConfigError(f"--resume: checkpoint {path} is of model {other!r}, not "
                              f"{cfg['model']!r}")
        if saved != cfg or ck.get("step") != start:
            raise ConfigError(f"--resume: checkpoint {path} does not match this config")
        ranks = ck["rng"].get("ranks", [ck["rng"]["torch"]])
        if len(ranks) != group.world:
            raise ConfigError(f"--resume: checkpoint {path} was written by {len(ranks)} "
                              f"process(es); resume it with as many, not {group.world}")
        try:
            if par == "fsdp":
                from torch.distributed.checkpoint import state_dict as dcp_sd

                opts = dcp_sd.StateDictOptions(full_state_dict=True)
                dcp_sd.set_model_state_dict(model, ck["model"], options=opts)
                dcp_sd.set_optimizer_state_dict(model, optimizer, ck["optimizer"],
                                                options=opts)
            else:
                model.load_state_dict(ck["model"])
                optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise ConfigError(f"--resume: checkpoint {path} does not fit the model "
                              f"({e})") from None
        scheduler.load_state_dict(ck["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ranks[group.rank])
        if group.device.type == "cuda" and ck["rng"].get("cuda"):
            torch.cuda.set_rng_state(ck["rng"]["cuda"][group.rank], group.device)
    group.barrier()  # every process has passed every check: now rank 0 writes
    if lead:
        os.makedirs(out, exist_ok=True)
        if not args.resume:
            atomic_write_json(os.path.join(out, "config.json"), cfg)
        os.makedirs(ckpt_dir, exist_ok=True)
        rewrite_metrics(metrics_path, start)

    per_epoch = len(dataset.train.x) // cfg["batch_size"]

    def make_batch(x, y, seed):
        """The global batch (MLM masks drawn for all of it), then this rank's shard."""
        if task == "classification":
            images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
            batch = images.to(in_dtype), torch.from_numpy(y).long()
        else:
            ids = torch.from_numpy(np.asarray(x)).long()
            inputs, labels = mlm.mask_tokens(
                ids, torch.Generator().manual_seed(seed), mask_id=data_lib.MASK_ID,
                vocab_size=data_lib.TEXT_VOCAB, pad_id=data_lib.PAD_ID,
                prob=cfg["mask_prob"])
            batch = inputs, labels, ids != data_lib.PAD_ID
        rows = group.shard(len(x))
        return tuple(t[rows].to(group.device) for t in batch), batch

    def evaluate() -> dict:
        split, bs = dataset.test, cfg["batch_size"]
        sums: dict = {}
        for i in range(0, len(split.x), bs):
            idx = np.arange(i, i + bs) % len(split.x)
            w = torch.from_numpy((np.arange(i, i + bs) < len(split.x)).astype(np.float32))
            y = None if split.y is None else split.y[idx]
            batch, _ = make_batch(split.x[idx], y, _seed(cfg["seed"], 3, i))
            w = w[group.shard(bs)].to(group.device)
            for k, v in T.eval_step(model, batch, w, task=task, mode=mode).items():
                sums[k] = sums.get(k, 0.0) + v
        keys = sorted(sums)
        sums = dict(zip(keys, group.sum([sums[k] for k in keys])))
        res = {"eval_loss": sums["loss_sum"] / max(sums["count"], 1)}
        if task == "classification":
            res["eval_accuracy"] = sums["correct"] / sums["count"]
        return res

    def save(step: int) -> None:
        """Collective (FSDP gathers full tensors, every rank's RNG state); rank 0 writes."""
        if par == "fsdp":
            from torch.distributed.checkpoint import state_dict as dcp_sd

            model_sd = dcp_sd.get_model_state_dict(model, options=_full_options())
            optim_sd = dcp_sd.get_optimizer_state_dict(model, optimizer,
                                                       options=_full_options())
        else:
            model_sd, optim_sd = model.state_dict(), optimizer.state_dict()
        rng = {"torch": torch.get_rng_state()}
        if group.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(group.device)
        ranks = group.gather(rng)
        if not lead:
            return
        payload = {"config": cfg, "step": step, "processes": group.world,
                   "data_position": {"epoch": step // per_epoch,
                                     "batch_in_epoch": step % per_epoch},
                   "model": model_sd, "optimizer": optim_sd,
                   "scheduler": scheduler.state_dict(),
                   "scaler": None if scaler is None else scaler.state_dict(),
                   "rng": {"torch": rng["torch"], "ranks": [r["torch"] for r in ranks],
                           **({"cuda": [r["cuda"] for r in ranks]} if "cuda" in rng
                              else {})}}
        _save(os.path.join(ckpt_dir, f"step_{step:08d}.pt"), payload)
        for _, old in checkpoints(out)[:-2]:
            os.unlink(old)

    net.train()
    t0, steps, last = time.time(), cfg["steps"], {}
    end = steps if args.stop_after is None else min(steps, args.stop_after)
    bar = tqdm(range(start, end), initial=start, total=steps,
               disable=args.no_progress or not lead,
               desc=f"{cfg['model']} {mode or ''} torch".strip(), dynamic_ncols=True)
    log = open(metrics_path, "a") if lead else None
    try:
        for s in bar:
            idx = data_lib.batch_indices(len(dataset.train.x), cfg["batch_size"],
                                         cfg["seed"], s)
            y = None if dataset.train.y is None else dataset.train.y[idx]
            batch, whole = make_batch(dataset.train.x[idx], y, _seed(cfg["seed"], 2, s))
            weight = 1.0
            if task == "mlm" and group.world > 1:  # the ranks' shares of the predicted tokens
                local = int((batch[1] != mlm.IGNORE).sum())
                weight = group.world * local / max(int((whole[1] != mlm.IGNORE).sum()), 1)
            m = T.scheduled_train_step(net, optimizer, scheduler, batch, task=task,
                                       mode=mode, scaler=scaler, clip_norm=clip,
                                       loss_weight=weight)
            loss, gnorm = group.sum([m["loss"]])[0] / group.world, m["grad_norm"]
            # with a GradScaler a non-finite gradient is a skipped step, not a failure
            if not math.isfinite(loss) or (scaler is None and not math.isfinite(gnorm)):
                good = checkpoints(out)
                where = (f"the last good checkpoint (step {good[-1][0]}) is kept in "
                         f"{ckpt_dir}" if good else "no checkpoint was written before it")
                raise TrainingError(f"non-finite loss {loss} (gradient norm {gnorm}) at step "
                                    f"{s + 1}; stopped, {where}")
            rec = {"step": s + 1, "loss": loss, "grad_norm": gnorm,
                   "lr": T.learning_rate(s, cfg["lr"], steps, cfg["warmup"])}
            done = s + 1
            if done % args.eval_every == 0 or done == steps:
                last = evaluate()
                rec.update(last)
            if log is not None:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{loss:.4f}", **{k: f"{v:.4f}" for k, v in last.items()})
            if done % args.ckpt_every == 0 or done == end:
                save(done)
    finally:
        if log is not None:
            log.close()
    bar.close()
    if end < steps:
        return {"status": "stopped", "step": end, "out": out,
                **({"rank": group.rank} if not lead else {})}
    if not last:  # resumed after the last step: evaluate the restored state
        last = evaluate()
    if not lead:
        return {"status": "done", "step": steps, "out": out, "rank": group.rank, **last}
    losses = [json.loads(line)["loss"] for line in open(metrics_path)]
    summary = {"status": "done", "config": cfg, "task": task, "framework": "torch",
               "processes": group.world, "parallel": par,
               "mode": mode or model.mode, "steps": steps, "final_train_loss": losses[-1],
               **last, "train_examples": len(dataset.train.x),
               "test_examples": len(dataset.test.x), "resumed_from": start or None,
               "wall_s_this_process": time.time() - t0,
               "params": int(sum(p.numel() for p in model.parameters())),
               "environment": environment()}
    atomic_write_json(os.path.join(out, "summary.json"), summary)
    return summary


__all__ = ["check_config", "check_parallel", "checkpoints", "environment", "final_state_dict",
           "launched", "leave", "shard_model", "train"]
