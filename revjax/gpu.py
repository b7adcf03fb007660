"""Compiling for an NVIDIA GPU without one, and reading PaReprop's stream overlap from the
compiled program.

XLA compiles for a GPU target from a description of the chip (a ``GpuTargetConfigProto``)
on a machine with no GPU and no driver (PJRT deviceless compilation). It needs the CUDA
plugin (about 0.5 GB, no NVIDIA libraries) and JAX pinned to the CPU platform for everything
else (``JAX_PLATFORMS=cpu``).

Where the plugin lives. Installed into a venv, it makes every ``import jax`` there probe for
CUDA and print a traceback on a machine without one. So ``make`` installs it apart, into
``.venv/gpu-compile`` (``pip install --target``; ``plugin_dir``, or ``$REVJAX_GPU_COMPILE_PATH``),
and the programs that compile for a GPU run in a subprocess that sees it (``plugin_env``,
``run_with_plugin``); ``pip install 'revjax[gpu-compile]'`` into a venv of its own also works.
In a process that sees the plugin::

    topo = revjax.gpu.topology("h200")
    args = revjax.gpu.abstract((params, batch), topo)
    compiled = jax.jit(step, compiler_options=revjax.GPU_COMPILER_OPTIONS).trace(*args) \
        .lower().compile()
    revjax.gpu.stream_overlap(compiled.as_text())

``stream_overlap`` reads the scheduled HLO: it finds the loop body that holds pareprop's
async regions and simulates it on a model GPU (``simulate``: the main stream in order, each
region on its stream, a done waiting for its region, every kernel timed by its estimated
FLOPs and bytes) and reports the simulated makespan over the serial sum (``ratio``; 1.0: the
regions run one after the other, 0.5: two equal halves fully side by side). Kernel traces
from a real GPU are read with the same measure (``overlap_ratio``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from importlib import resources

import jax
from jax.sharding import SingleDeviceSharding

TARGETS = ("h200",)


def target_config(name: str = "h200") -> str:
    """The ``GpuTargetConfigProto`` text for GPU model ``name`` (one of ``TARGETS``)."""
    if name not in TARGETS:
        raise ValueError(f"unknown GPU target {name!r}; known: {', '.join(TARGETS)}")
    return resources.files("revjax").joinpath("targets", f"{name}.txtpb").read_text()


def plugin_available() -> bool:
    """Whether the CUDA PJRT plugin that deviceless compilation needs is installed."""
    if importlib.util.find_spec("jax_plugins") is None:  # no plugin of any kind
        return False
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None
               for v in (12, 13))


PLUGIN_DIR_ENV = "REVJAX_GPU_COMPILE_PATH"


def plugin_dir() -> str:
    """The folder holding the plugin apart from the venv: ``$REVJAX_GPU_COMPILE_PATH``, else
    ``gpu-compile`` inside the running Python's prefix (``.venv/gpu-compile``, where ``make``
    puts it)."""
    return os.environ.get(PLUGIN_DIR_ENV) or os.path.join(sys.prefix, "gpu-compile")


def plugin_installed_apart() -> bool:
    """Whether ``plugin_dir()`` holds a CUDA plugin (for a subprocess: ``plugin_env``)."""
    return any(os.path.isdir(os.path.join(plugin_dir(), "jax_plugins", f"xla_cuda{v}"))
               for v in (12, 13))


def plugin_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's) for a subprocess that compiles for a GPU: the plugin
    folder first on ``PYTHONPATH`` and JAX on the CPU platform."""
    env = dict(os.environ if env is None else env)
    path = [plugin_dir(), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_with_plugin(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``python argv...`` (this interpreter) where the plugin is seen (``plugin_env``).

    Raises ``RuntimeError`` when the plugin is neither importable here nor installed apart.
    ``kwargs`` go to ``subprocess.run`` (``check``, ``capture_output``, ``cwd``, ...)."""
    if not (plugin_available() or plugin_installed_apart()):
        raise RuntimeError(_NO_PLUGIN)
    return subprocess.run([sys.executable, *argv], env=plugin_env(), **kwargs)


def rerun_with_plugin(module: str, argv: list[str]) -> int | None:
    """For a command line ``python -m module argv...`` that compiles for a GPU: None when
    this process sees the plugin (go on here); otherwise the exit code of the same command
    run where it is seen (``run_with_plugin``)."""
    if plugin_available():
        return None
    return run_with_plugin(["-m", module, *argv]).returncode


_NO_PLUGIN = ("compiling for a GPU without one needs the CUDA plugin: `make` installs it into "
              ".venv/gpu-compile (pip install --no-deps --target .venv/gpu-compile -c "
              "constraints.txt jax-cuda12-plugin jax-cuda12-pjrt), or pip install "
              "'revjax[gpu-compile]' into a venv of its own")


def topology(name: str = "h200"):
    """A one-device CUDA topology of GPU model ``name`` that compiles without a GPU."""
    from jax.experimental import topologies

    if not plugin_available():
        where = (" It is installed apart, in " + plugin_dir() + ": run this program through "
                 "revjax.gpu.run_with_plugin.") if plugin_installed_apart() else ""
        raise RuntimeError(_NO_PLUGIN + "." + where)
    return topologies.get_topology_desc(platform="cuda", target_config=target_config(name),
                                        topology="1x1x1")


def abstract(tree, topo):
    """``tree``'s arrays as ``jax.ShapeDtypeStruct`` placed on ``topo``'s first device."""
    sharding = SingleDeviceSharding(topo.devices[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        tree)


# ----------------------------------------------------------------- the scheduled HLO

_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_INSTR = re.compile(r"^\s+(ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\(([^)]*)\)(.*)$")
_STREAM = re.compile(r'_xla_stream_annotation="(\d+)"')
_QUEUE = re.compile(r'"operation_queue_id":"(\d+)"')
_CALLED = re.compile(r"(?:calls|to_apply)=%([\w.\-]+)")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}
# Instructions that launch no kernel: plumbing, and the async pairs' own start/done.
_NOT_WORK = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant",
             "opt-barrier", "after-all", "add-dependency", "partition-id", "replica-id",
             "call-start", "call-done", "async-start", "async-update", "async-done",
             "copy-start", "copy-done"}
_STARTS, _DONES = {"call-start", "async-start"}, {"call-done", "async-done"}
_SLICES = {"dynamic-slice", "slice", "gather"}
_NO_KERNEL_TARGETS = ("annotate_device_placement",)


def computations(hlo: str) -> dict[str, list[str]]:
    """HLO module text -> {computation name: its instruction lines in (schedule) order}."""
    out, name = {}, None
    for line in hlo.splitlines():
        m = _HEADER.match(line)
        if m:
            name = m.group(1)
            out[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None and _INSTR.match(line):
            out[name].append(line)
    return out


def _parse(line: str):
    """``(root?, name, result shape, opcode, operand names, attributes)`` of one line."""
    root, name, shape, op, operands, attrs = _INSTR.match(line).groups()
    return bool(root), name, shape, op, re.findall(r"%([\w.\-]+)", operands), attrs


def _arrays(shape: str) -> list[tuple[str, list[int]]]:
    """The arrays of an HLO shape (a tuple's elements in order): ``[(dtype, dims)]``."""
    return [(t, [int(d) for d in dims.split(",") if d]) for t, dims in _ARRAY.findall(shape)
            if t in _BYTES]


def _size(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _nbytes(shape: str) -> int:
    return sum(_BYTES[t] * _size(dims) for t, dims in _arrays(shape))


class _Module:
    """The computations of a scheduled module with each one's value shapes, for estimates."""

    def __init__(self, comps: dict[str, list[str]]):
        self.comps = comps
        self._shapes: dict[str, dict[str, str]] = {}

    def shapes(self, comp: str) -> dict[str, str]:
        if comp not in self._shapes:
            self._shapes[comp] = {_parse(line)[1]: _parse(line)[2]
                                  for line in self.comps.get(comp, ())}
        return self._shapes[comp]

    def region(self, comp: str) -> list:
        """The kernels that an async region running computation ``comp`` launches."""
        return [k for line in self.comps.get(comp, ()) for k in self.kernels(comp, line)]

    def flops(self, comp: str, line: str) -> float:
        """Multiply-adds x 2 of a dot, GEMM custom call or convolution (fusions: of the dots
        and convolutions inside); 0 for anything else."""
        _, _, shape, op, operands, attrs = _parse(line)
        called = _CALLED.search(attrs)
        if op == "fusion" and called:
            return sum(self.flops(called.group(1), inner)
                       for inner in self.comps.get(called.group(1), ()))
        arrays, shapes = _arrays(shape), self.shapes(comp)
        if not arrays or not operands:
            return 0.0
        out = _size(arrays[0][1])
        contracting = (re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
                       or re.search(r'"lhs_contracting_dimensions":\[([\d",]*)\]', attrs))
        if (op == "dot" or "__cublas" in attrs) and contracting:
            lhs = _arrays(shapes.get(operands[0], ""))
            dims = [int(d) for d in contracting.group(1).replace('"', "").split(",") if d]
            if lhs and all(d < len(lhs[0][1]) for d in dims):
                return 2.0 * out * _size(lhs[0][1][d] for d in dims)
        labels = re.search(r"dim_labels=\w+_(\w+)->\w+", attrs)
        if (op == "convolution" or "__cudnn$conv" in attrs) and labels and len(operands) > 1:
            kernel = _arrays(shapes.get(operands[1], ""))
            o = labels.group(1).find("o")
            if kernel and 0 <= o < len(kernel[0][1]) and kernel[0][1][o]:
                return 2.0 * out * _size(kernel[0][1]) / kernel[0][1][o]
        return 0.0

    def nbytes(self, comp: str, line: str) -> float:
        """Bytes a kernel moves, estimated: what it reads and writes, where a slice reads only
        what it keeps and an in-place update writes only the update (a fusion: per parameter
        and per result, by what the fused computation does with it)."""
        _, _, shape, op, operands, attrs = _parse(line)
        shapes, called = self.shapes(comp), _CALLED.search(attrs)
        if not (op == "fusion" and called):
            if op in _SLICES:
                return 2.0 * _nbytes(shape)
            if op == "dynamic-update-slice" and len(operands) > 1:
                return 2.0 * _nbytes(shapes.get(operands[1], ""))
            return float(_nbytes(shape) + sum(_nbytes(shapes.get(o, "")) for o in operands))
        inner, fused = [_parse(x) for x in self.comps.get(called.group(1), ())], {}
        users: dict[str, list] = {}
        for p in inner:
            fused[p[1]] = p
            for pos, o in enumerate(p[4]):
                users.setdefault(o, []).append((p[3], pos, p[2]))
        total = 0.0
        for p in inner:
            if p[3] != "parameter":
                continue
            uses = users.get(p[1], [])
            if uses and all(op in _SLICES and pos == 0 for op, pos, _ in uses):
                total += sum(_nbytes(s) for *_, s in uses)
            elif not (uses and all(op == "dynamic-update-slice" and pos == 0
                                   for op, pos, _ in uses)):
                total += _nbytes(p[2])
        root = next((p for p in inner if p[0]), None)
        outs = [fused.get(o) for o in root[4]] if root and root[3] == "tuple" else [root]
        for out in outs:
            if out and out[3] == "dynamic-update-slice" and len(out[4]) > 1:
                total += _nbytes(fused[out[4][1]][2]) if out[4][1] in fused else 0
            elif out:
                total += _nbytes(out[2])
        return total

    def kernels(self, comp: str, line: str):
        """The kernels ``line`` of ``comp`` launches, as ``(flops, bytes)`` each: none for
        plumbing, a plain ``call``'s through the computation it calls, one otherwise."""
        _, _, _, op, _, attrs = _parse(line)
        called = _CALLED.search(attrs)
        if op in _NOT_WORK or (op == "custom-call"
                               and any(t in attrs for t in _NO_KERNEL_TARGETS)):
            return
        if op == "call" and called:
            for inner in self.comps.get(called.group(1), ()):
                yield from self.kernels(called.group(1), inner)
            return
        yield self.flops(comp, line), self.nbytes(comp, line)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """A kernel's estimated time: ``launch_s + max(flops / flops_per_s, bytes /
    bytes_per_s)`` (a roofline with a fixed cost per launch). The defaults are an H200's
    order of magnitude (dense TF32/BF16 GEMMs at a realistic rate, HBM3e bandwidth); with
    ``launch_s`` alone (both rates infinite) every kernel counts the same."""

    flops_per_s: float = 4e14
    bytes_per_s: float = 4e12
    launch_s: float = 2e-6

    def time(self, flops: float, nbytes: float) -> float:
        return self.launch_s + max(flops / self.flops_per_s, nbytes / self.bytes_per_s)


H200 = CostModel()


def overlap_ratio(spans: dict) -> float | None:
    """Makespan over serial sum: the time at least one stream is busy, over the sum of each
    stream's busy time (``spans``: {stream: [(start, end), ...]}). 1.0: the streams' work
    never overlaps; 0.5: two equal streams fully side by side. None without work. The
    simulated schedule (``simulate``) and measured kernel traces are read with it alike."""
    def busy(intervals):
        total, end = 0.0, float("-inf")
        for s, e in sorted(iv for iv in intervals if iv[1] > iv[0]):
            total += max(0.0, e - max(s, end))
            end = max(end, e)
        return total

    serial = sum(busy(v) for v in spans.values())
    return busy([iv for v in spans.values() for iv in v]) / serial if serial > 0 else None


def _stream_of(module: _Module, start_line: str, called: str | None, name: str) -> str:
    """A region's stream: its stream annotation, else a nonzero ``operation_queue_id`` (its
    own or its wrapped instruction's, as ``q<id>``), else a stream of its own."""
    m = _STREAM.search(start_line)
    if m:
        return m.group(1)
    for line in [start_line, *module.comps.get(called or "", ())]:
        q = _QUEUE.search(line)
        if q and q.group(1) != "0":
            return "q" + q.group(1)
    return name


def simulate(comps: dict[str, list[str]], body: str, model: CostModel = H200) -> dict:
    """Run computation ``body`` of a scheduled module (``computations``) on a model GPU:
    the main stream runs its kernels in schedule order; an async start launches its region
    (the called computation's kernels, back to back) on the region's stream once the main
    stream reaches it and that stream is free; a done holds the main stream until its region
    ends. Each kernel takes ``model``'s time for its estimated FLOPs (dots, GEMMs,
    convolutions) and bytes.

    Returns ``{"spans": {stream: [(start, end)]}, "kernels": {stream: n}, "pairs": {stream:
    n}, "timeline", "makespan", "serial", "ratio"}`` (stream ``"main"`` and the regions'
    streams; ``ratio``: ``overlap_ratio`` of the spans, makespan over serial sum).
    """
    module, t, free, open_ = _Module(comps), 0.0, {}, {}
    spans, kernels, pairs, events, run = {"main": []}, {"main": 0}, {}, [], 0
    for line in comps[body]:
        _, name, _, op, operands, attrs = _parse(line)
        called = _CALLED.search(attrs)
        if op in _STARTS and called:
            work = module.region(called.group(1))
            stream = _stream_of(module, line, called.group(1), name)
            begin = max(t, free.get(stream, 0.0))
            end = free[stream] = begin + sum(model.time(*k) for k in work)
            spans.setdefault(stream, []).append((begin, end))
            kernels[stream] = kernels.get(stream, 0) + len(work)
            pairs[stream] = pairs.get(stream, 0) + 1
            open_[name] = (stream, end)
            events += [f"[{run} main]"] * bool(run) + [f"S{stream}({len(work)})"]
            run = 0
        elif op in _DONES and operands and operands[0] in open_:
            stream, end = open_.pop(operands[0])
            t = max(t, end)
            events += [f"[{run} main]"] * bool(run) + [f"D{stream}"]
            run = 0
        else:
            for k in module.kernels(body, line):
                spans["main"].append((t, t + model.time(*k)))
                t = spans["main"][-1][1]
                kernels["main"] += 1
                run += 1
    events += [f"[{run} main]"] * bool(run)
    makespan = max([t, *(e for v in spans.values() for _, e in v)])
    serial = sum(e - s for v in spans.values() for s, e in v)
    return {"spans": spans, "kernels": kernels, "pairs": pairs, "timeline": " ".join(events),
            "makespan": makespan, "serial": serial, "ratio": overlap_ratio(spans)}


def dataflow_ratio(comps: dict[str, list[str]], body: str, model: CostModel = H200) -> float:
    """The same body run as a dependency graph (CUDA-graph command buffers in XLA's
    ``CONCURRENT`` mode launch a kernel once its inputs are written): the critical path of
    the kernels' data dependencies over their serial sum, each async region one node. A
    bound, not a schedule: it ignores write-after-read hazards and assumes that concurrent
    kernels never slow each other down."""
    module, done, serial = _Module(comps), {}, 0.0
    for line in comps[body]:
        _, name, _, op, operands, attrs = _parse(line)
        called = _CALLED.search(attrs)
        if op in _STARTS and called:
            work = module.region(called.group(1))
        else:
            work = list(module.kernels(body, line))
        cost = sum(model.time(*k) for k in work)
        serial += cost
        done[name] = max((done.get(o, 0.0) for o in operands), default=0.0) + cost
    return max(done.values(), default=0.0) / serial if serial > 0 else 1.0


def _regions(comps, name: str) -> int:
    """Async starts in computation ``name`` whose region launches at least one kernel."""
    module, n = _Module(comps), 0
    for line in comps[name]:
        _, _, _, op, _, attrs = _parse(line)
        called = _CALLED.search(attrs)
        if op in _STARTS and called and any(
                True for inner in comps.get(called.group(1), ())
                for _ in module.kernels(called.group(1), inner)):
            n += 1
    return n


def stream_overlap(hlo: str, model: CostModel = H200) -> dict:
    """The simulated overlap of pareprop's async regions in the scheduled HLO text of a
    compiled program.

    Picks the computation with the most async regions that launch kernels (pareprop's layer
    loop body; the unrolled steps when XLA unrolls it) and ``simulate``s it:
    ``{"computation", "timeline", "pairs": {stream: n}, "kernels": {stream: n}, "busy":
    {stream: seconds}, "makespan", "serial", "ratio"}``. ``ratio`` is the simulated makespan
    over the serial sum of the body (1.0: nothing overlaps; the main stream's kernels count
    in both); None, with ``computation`` None, when no computation holds such a region.
    """
    comps = computations(hlo)
    counts = {name: _regions(comps, name) for name in comps}
    best = max(counts, key=lambda n: counts[n], default=None)
    if best is None or counts[best] == 0:
        return {"computation": None, "timeline": "", "pairs": {}, "kernels": {}, "busy": {},
                "makespan": None, "serial": None, "ratio": None}
    sim = simulate(comps, best, model)
    return {"computation": best, "timeline": sim["timeline"], "pairs": sim["pairs"],
            "kernels": sim["kernels"],
            "busy": {s: sum(e - b for b, e in v) for s, v in sim["spans"].items()},
            "makespan": sim["makespan"], "serial": sim["serial"], "ratio": sim["ratio"]}
