"""GPU overlap check: do pareprop's two streams' kernels run at the same time?

Traces warm pareprop gradient steps (jax: ``jax.profiler.trace``, read back with
``jax.profiler.ProfileData``; torch: ``torch.profiler`` on the backward, read from its
exported trace), collects each CUDA stream's kernel intervals and reports, per traced step,
the time the two busiest streams' kernels overlap as a share of the shorter one's busy time,
the busy time of all streams together over the sum of each one's (``ratio``, the measure
``revjax.gpu`` simulates on the compiled program), with the per-layer-step average (the
step's overlap over the depth - 1 layer steps where the grads of layer i can overlap the
rebuild of layer i-1). Without a GPU (``--smoke``, or no
device) it runs a tiny config end to end and reports the streams it found, which are none:
overlap is null, never a made-up number.

    python -m experiments.bench overlap --smoke --out results/overlap
    python -m experiments.bench overlap --model rev-vit-b --batch 32 --img 224 --out results/overlap
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import re
import time

from experiments.common import atomic_write_json, environment, table

Interval = tuple[float, float]

# ------------------------------------------------------------------ interval arithmetic


def union(intervals) -> list[Interval]:
    """The sorted, disjoint union of ``(start, end)`` intervals (touching ones merge)."""
    out: list[list[float]] = []
    for s, e in sorted((float(s), float(e)) for s, e in intervals if e > s):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def busy(intervals) -> float:
    """Time covered by at least one interval."""
    return sum(e - s for s, e in union(intervals))


def overlap(a, b) -> float:
    """Time covered by both an interval of ``a`` and one of ``b``."""
    ua, ub, total, i, j = union(a), union(b), 0.0, 0, 0
    while i < len(ua) and j < len(ub):
        total += max(0.0, min(ua[i][1], ub[j][1]) - max(ua[i][0], ub[j][0]))
        if ua[i][1] < ub[j][1]:
            i += 1
        else:
            j += 1
    return total


def clip(intervals, window: Interval) -> list[Interval]:
    """The parts of ``intervals`` inside ``window``."""
    lo, hi = window
    return [(max(s, lo), min(e, hi)) for s, e in intervals if min(e, hi) > max(s, lo)]


def stream_overlap(streams: dict, layer_steps: int) -> dict:
    """Busy time per stream, every pair's overlap, ``ratio``: the time any stream is busy
    over the sum of the streams' busy times (``revjax.gpu.overlap_ratio``, the measure the
    deviceless compile simulates; 1.0: nothing overlaps), and for the two busiest streams
    their overlap as a share of the shorter one's busy time (null with fewer than two
    streams)."""
    from revjax.gpu import overlap_ratio

    times = {str(k): busy(v) for k, v in streams.items()}
    pairs = {f"{a}|{b}": overlap(streams[a], streams[b])
             for a, b in itertools.combinations(sorted(streams, key=str), 2)}
    out = {"busy": times, "pairs": pairs, "pair": None, "overlap": None, "share": None,
           "ratio": overlap_ratio(streams), "overlap_per_layer_step": None}
    ranked = sorted(streams, key=lambda k: -times[str(k)])[:2]
    if len(ranked) == 2 and min(times[str(k)] for k in ranked) > 0:
        a, b = ranked
        both = overlap(streams[a], streams[b])
        out.update(pair=[str(a), str(b)], overlap=both,
                   share=both / min(times[str(a)], times[str(b)]),
                   overlap_per_layer_step=both / layer_steps if layer_steps > 0 else None)
    return out


def per_step(streams: dict, windows: list[Interval], layer_steps: int) -> list[dict]:
    """``stream_overlap`` inside each step window."""
    return [stream_overlap({k: clip(v, w) for k, v in streams.items()}, layer_steps)
            for w in windows]


# ------------------------------------------------------------------ jax

_STREAM_LINE = re.compile(r"^Stream #(\d+)")


def jax_streams(data):
    """(kernel intervals in ns by stream, step windows, device line count, events per plane)
    from a ``jax.profiler.ProfileData``.
    GPU device planes (``/device:GPU:N``) hold one line per CUDA stream ("Stream #N(...)")
    plus derived lines; the "XLA Modules" line gives one event per program run (a step)."""
    streams, windows, lines, planes = {}, [], 0, {}
    for plane in data.planes:
        planes[plane.name] = sum(len(list(line.events)) for line in plane.lines)
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            lines += 1
            m = _STREAM_LINE.match(line.name)
            spans = [(e.start_ns, e.start_ns + e.duration_ns) for e in line.events]
            if m:
                streams[f"{plane.name}/{m.group(1)}"] = spans
            elif line.name == "XLA Modules":
                windows += spans
    return streams, sorted(windows), lines, planes


def run_jax(args, trace_dir: str) -> dict:
    """Trace warm jitted gradient steps of ``args.model`` in pareprop mode, with
    ``revjax.streams.GPU_STREAMS`` set to ``args.jax_gpu_streams`` while the step is traced,
    and restored after."""
    import revjax

    flag, revjax.streams.GPU_STREAMS = revjax.streams.GPU_STREAMS, args.jax_gpu_streams
    try:
        return _trace_jax(args, trace_dir)
    finally:
        revjax.streams.GPU_STREAMS = flag


def _trace_jax(args, trace_dir: str) -> dict:
    import jax
    from flax import nnx

    import revjax
    from revjax.train import cross_entropy_loss

    model = revjax.models.build(args.model, rngs=nnx.Rngs(0), mode="pareprop",
                                **_overrides(args))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    images = jax.random.normal(jax.random.key(0), (args.batch, args.img, args.img, 3))
    labels = jax.random.randint(jax.random.key(1), (args.batch,), 0, model.config.num_classes)

    def loss(p):
        return cross_entropy_loss(nnx.merge(graphdef, p, rest)(images), labels)

    options = revjax.streams.compiler_options()
    step = jax.jit(jax.grad(loss), compiler_options=options)
    for _ in range(args.warmup):
        jax.block_until_ready(step(params))
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            jax.block_until_ready(step(params))
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
    streams, windows, lines, planes = jax_streams(data)
    result = {"device": str(jax.devices()[0]), "trace": files, "device_lines": lines,
              "events_per_plane": planes, "streams": sorted(streams), "unit": "ns",
              "gpu_streams_flag": revjax.streams.GPU_STREAMS}
    return _summarise(result, streams, windows, _depth(model.config))


# ------------------------------------------------------------------ torch


def torch_streams(trace_json: str):
    """(kernel intervals in us by stream, step windows, device event count) from a
    ``torch.profiler`` chrome trace: kernels are ``cat == "kernel"`` with ``args.stream``;
    steps are the GPU spans of our ``record_function("overlap_step")``."""
    with open(trace_json) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    streams, windows, device = {}, [], 0
    for e in events:
        if e.get("ph") != "X":
            continue
        span = (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        if e.get("cat") == "kernel":
            device += 1
            streams.setdefault(str(e.get("args", {}).get("stream")), []).append(span)
        elif e.get("cat") == "gpu_user_annotation" and e.get("name") == "overlap_step":
            windows.append(span)
    return streams, sorted(windows), device


def run_torch(args, trace_dir: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import revtorch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = revtorch.models.build(args.model, mode="pareprop", **_overrides(args)).to(device)
    images = torch.randn(args.batch, 3, args.img, args.img, device=device)
    labels = torch.randint(0, model.config.num_classes, (args.batch,), device=device)

    def forward():
        return torch.nn.functional.cross_entropy(model(images), labels)

    for _ in range(args.warmup):
        forward().backward()
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            loss = forward()  # the forward runs on the caller's stream only: not profiled
            if cuda:
                torch.cuda.synchronize()
            with record_function("overlap_step"):
                loss.backward()
            if cuda:
                torch.cuda.synchronize()
            model.zero_grad(set_to_none=True)
    path = os.path.join(trace_dir, "torch_trace.json")
    prof.export_chrome_trace(path)
    streams, windows, device_events = torch_streams(path)
    cpu_ops = sum(1 for e in prof.events() if str(e.device_type).endswith("CPU"))
    result = {"device": str(torch.cuda.get_device_name() if cuda else "cpu"), "trace": [path],
              "device_lines": len(streams), "kernel_events": device_events,
              "cpu_events": cpu_ops, "streams": sorted(streams), "unit": "us"}
    return _summarise(result, streams, windows, _depth(model.config))


# ------------------------------------------------------------------ shared


def _overrides(args) -> dict:
    return {"img_size": args.img} | ({"depth": args.depth} if args.depth else {})


def _depth(config) -> int:
    depth = getattr(config, "depth", None)
    return depth if isinstance(depth, int) else sum(getattr(config, "depths", (1,)))


def _summarise(result: dict, streams: dict, windows: list, depth: int) -> dict:
    layer_steps = depth - 1
    result.update(depth=depth, layer_steps=layer_steps, steps=[], overlap=None, share=None,
                  ratio=None)
    if len(streams) < 2:
        result["reason"] = (f"no GPU streams found ({result['device_lines']} device lines)"
                            if not streams else "one GPU stream found: nothing can overlap")
        return result
    result["steps"] = per_step(streams, windows, layer_steps) if windows else []
    result["total"] = stream_overlap(streams, layer_steps * max(len(windows), 1))
    result["overlap"], result["share"] = result["total"]["overlap"], result["total"]["share"]
    result["ratio"] = result["total"]["ratio"]
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.bench overlap",
                                description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny config (CPU-fast)")
    p.add_argument("--framework", choices=("jax", "torch", "both"), default="both")
    p.add_argument("--model", default="rev-vit-b")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--depth", type=int, default=None, help="override the model's depth")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--jax-gpu-streams", action=argparse.BooleanOptionalAction, default=True,
                   help="set revjax.streams.GPU_STREAMS (pareprop's halves on two CUDA streams)")
    p.add_argument("--out", required=True, help="directory for overlap.json and the traces")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.img, args.steps, args.warmup = "rev-vit-test", 2, 16, 1, 1
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for name, run in (("jax", run_jax), ("torch", run_torch)):
        if args.framework in (name, "both"):
            trace_dir = os.path.join(args.out, f"trace_{name}")
            os.makedirs(trace_dir, exist_ok=True)
            results[name] = run(args, trace_dir)
    payload = {"config": {k: v for k, v in vars(args).items() if k != "out"},
               "environment": environment(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                   time.gmtime()),
               "results": results}
    atomic_write_json(os.path.join(args.out, "overlap.json"), payload)
    rows = [{"framework": k, "device": r["device"], "streams": len(r["streams"]),
             "steps": len(r["steps"]),
             "overlap": "null" if r["overlap"] is None else f"{r['overlap']:.4g} {r['unit']}",
             "share": "null" if r["share"] is None else f"{r['share']:.2f}",
             "ratio": "null" if r["ratio"] is None else f"{r['ratio']:.3f}",
             "note": r.get("reason", "")} for k, r in results.items()]
    print(table(rows, ["framework", "device", "streams", "steps", "overlap", "share", "ratio",
                       "note"]))
    return payload


if __name__ == "__main__":
    main()
