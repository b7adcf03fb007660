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

``stream_overlap`` reads the scheduled HLO: in the loop body that holds pareprop's two
stream-annotated halves it reports, per stream, the share of that stream's asynchronous work
that is in flight while work on the other stream is too (1.0: full interleave, 0.0: the
halves run one after the other).
"""

from __future__ import annotations

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
_INSTR = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\(([^)]*)\)")
_STREAM = re.compile(r'_xla_stream_annotation="(\d+)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_TO_APPLY = re.compile(r"to_apply=%([\w.\-]+)")
_NOT_WORK = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


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


def _work(comps, name: str) -> int:
    """Kernels an async computation launches: its instructions that are not plumbing, with
    plain ``call``s counted through to the computations they call."""
    n = 0
    for line in comps.get(name, ()):
        op = _INSTR.match(line).group(2)
        if op == "call" and _TO_APPLY.search(line):
            n += _work(comps, _TO_APPLY.search(line).group(1))
        elif op not in _NOT_WORK:
            n += 1
    return n


def async_intervals(comps, body: str) -> list[tuple[str, int, int, int]]:
    """Stream-annotated async pairs in computation ``body``:
    ``(stream, start position, done position, kernels)`` in schedule order."""
    lines = comps[body]
    starts, out = {}, []
    for pos, line in enumerate(lines):
        name, op, operands = _INSTR.match(line).groups()
        stream = _STREAM.search(line)
        if op == "call-start" and stream:
            called = _CALLS.search(line) or _TO_APPLY.search(line)
            starts[name] = (stream.group(1), pos, _work(comps, called.group(1)) if called else 1)
        elif op == "call-done":
            start = operands.strip().lstrip("%")
            if start in starts:
                s, p, w = starts.pop(start)
                out.append((s, p, pos, w))
    return out


def overlap_shares(intervals) -> dict[str, float]:
    """Per stream: the kernel-weighted share of its async pairs whose [start, done] span
    overlaps the span of a pair on another stream that launches kernels too (pairs that
    only move or alias buffers overlap nothing worth having)."""
    shares = {}
    for s in sorted({iv[0] for iv in intervals}):
        mine = [iv for iv in intervals if iv[0] == s]
        other = [iv for iv in intervals if iv[0] != s and iv[3] > 0]
        hit = sum(w for _, a, b, w in mine
                  if any(a < d and c < b for _, c, d, _ in other))
        total = sum(w for *_, w in mine)
        shares[s] = hit / total if total else 0.0
    return shares


def timeline(lines: list[str], intervals) -> str:
    """A computation's schedule (its instruction ``lines`` and ``async_intervals``) in short:
    ``S<stream>(<kernels>)`` for a start, ``D<stream>`` for a done, ``[n main]`` for n
    kernels on the main stream in between."""
    events = sorted([(a, f"S{s}({w})") for s, a, _, w in intervals]
                    + [(b, f"D{s}") for s, _, b, _ in intervals])
    out, last = [], -1
    for pos, event in events:
        n = sum(1 for line in lines[last + 1:pos] if _INSTR.match(line).group(2) not in _NOT_WORK)
        out += [f"[{n} main]"] * bool(n) + [event]
        last = pos
    return " ".join(out)


def stream_overlap(hlo: str) -> dict:
    """Overlap of pareprop's two streams in the scheduled HLO text of a compiled program.

    Looks at every computation holding stream-annotated async pairs on two or more streams
    (pareprop's layer loop body; the unrolled steps when XLA unrolls it) and reports the one
    with the most pairs: ``{"computation", "timeline", "pairs": {stream: count},
    "kernels": {stream: n}, "share": {stream: overlap share}}``; ``share`` is empty when no
    computation holds two streams (nothing is placed on streams, or the halves ended up in
    different places).
    """
    comps = computations(hlo)
    best = None
    for name in comps:
        ivs = async_intervals(comps, name)
        if len({iv[0] for iv in ivs}) >= 2 and (best is None or len(ivs) > len(best[1])):
            best = (name, ivs)
    if best is None:
        return {"computation": None, "timeline": "", "pairs": {}, "kernels": {}, "share": {}}
    name, ivs = best
    streams = sorted({iv[0] for iv in ivs})
    return {"computation": name, "timeline": timeline(comps[name], ivs),
            "pairs": {s: sum(1 for iv in ivs if iv[0] == s) for s in streams},
            "kernels": {s: sum(iv[3] for iv in ivs if iv[0] == s) for s in streams},
            "share": overlap_shares(ivs)}
