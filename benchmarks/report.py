"""The Markdown report: the machine, the versions, then one table per measurement, and
the targets as a PASS / FAIL checklist.

Everything here is pure formatting and arithmetic on the results `__main__` collected
(lists of seconds, MiB, logits files); nothing is measured here. Conventions:

- a time is the median of its samples, shown with min and max where it matters;
- throughput is batch / median seconds per batch (img/s);
- GFLOP/s is 2 * MACs / seconds, MACs of the model measured from `pyincept.summary.layer_table`
  (Inception v3: 5.713 GMACs = 11.43 GFLOP per 299x299 image; GoogLeNet: 1.498 GMACs =
  3.00 GFLOP per 224x224 image; conv and fc only);
- % of FMA peak is GFLOP/s divided by 2 x threads x one core's FMA peak in GFMA/s, the
  peak measured with pyincept's own micro-kernel (`gemm.peak_gfma`) on the SIMD path
  pyincept ran: the roof no multiply-add can beat on these cores;
- a ratio is pyincept's number divided by the other engine's: below 1 is better for
  latency and memory, above 1 is better for throughput.
"""

import importlib.metadata
import importlib.util
import os
import platform
import statistics
from pathlib import Path

VERSIONED = ["numpy", "numba", "llvmlite", "torch", "torchvision", "onnxruntime", "onnx", "pyincept"]


# --- the machine and the software ------------------------------------------------------------


def machine():
    """CPU model and the SIMD flags that matter for sgemm, cores, RAM, OS."""
    info = {"cpu": platform.processor() or platform.machine(), "flags": [], "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "ram_gib": None, "os": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]                  # the first processor's block
        cpu = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in first.splitlines()))
        if cpu.get("model name"):
            info["cpu"] = (f"{cpu['model name']} (family {cpu.get('cpu family', '?')}, model {cpu.get('model', '?')}, "
                           f"{cpu.get('cpu MHz', '?')} MHz)")
        info["flags"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in cpu.get("flags", "").split()]
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["ram_gib"] = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return info


def versions():
    """{package: version}, None for a package that is not installed (or cannot be imported)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name) if importlib.util.find_spec(name) else None
        except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
            out[name] = None
    return out


def source(root):
    """The commit measured, and whether pyincept/ differs from it (read-only git: no index refresh)."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "pyincept")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not commit:
        return "unknown (not a git checkout)"
    return commit + (" + uncommitted changes in pyincept/ (measured as they were on disk)" if changed else ", clean pyincept/")


# OpenBLAS kernels older than the AVX-512 ones, which a forced OPENBLAS_CORETYPE can pin a newer CPU to
_PRE_AVX512 = {"prescott", "core2", "penryn", "dunnington", "nehalem", "sandybridge", "haswell", "zen", "atom",
               "barcelona", "bulldozer", "piledriver", "steamroller", "excavator"}


def forced_kernel_warning(plan, machine):
    """A line when the engines run with OPENBLAS_CORETYPE forcing an older kernel than this CPU's, else None."""
    core = (plan.get("openblas_env") or {}).get("OPENBLAS_CORETYPE")
    if plan.get("openblas_as_set") and core and core.lower() in _PRE_AVX512 and "avx512f" in machine.get("flags", []):
        return (f"OPENBLAS_CORETYPE={core} forces an older sgemm kernel than this CPU supports (it has AVX-512): "
                "the numbers are not what users get; run without --openblas-as-set")
    return None


def openblas_line(res):
    """Which OpenBLAS kernel numpy loaded in the engines' environment, and why."""
    plan = res["plan"]
    kernel = " / ".join(map(str, (res.get("simd") or {}).get("openblas") or ["?"]))
    env = plan.get("openblas_env") or {}
    shown = ", ".join(f"{k}={v}" for k, v in env.items())
    how = (f"as set ({shown or 'neither is set'}; `--openblas-as-set`)" if plan.get("openblas_as_set") else
           "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset in every engine's process, as on a user's machine"
           + (f" (this shell sets {shown})" if shown else ""))
    warning = forced_kernel_warning(plan, res.get("machine", {}))
    line = f"OpenBLAS kernel **{kernel}** ({how})"
    return line + (f"  \n  **Warning: {warning}.**" if warning else "")


def numpy_blas():
    """numpy's BLAS, as numpy reports it (`np.matmul` of the matrix-product section runs on it)."""
    try:
        import numpy as np

        config = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{config.get('name')} {config.get('version')}"
    except Exception:  # noqa: BLE001 - a header line, never worth failing for
        return "unknown"


# --- arithmetic --------------------------------------------------------------------------


def summary(times):
    """{median, min, max, n} of a list of seconds (None when there are none)."""
    if not times:
        return None
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def gflops(macs, seconds):
    return 2.0 * macs / seconds / 1e9 if macs and seconds else None


def fma_peak(res, threads=None):
    """The machine's FMA peak in GFLOP/s on `threads` cores (the plan's, unless given):
    2 flops per FMA x threads x one core's GFMA/s for the micro-kernel of the SIMD path
    pyincept ran, as the `simd` worker measured it. None when it was not measured."""
    simd = res.get("simd") or {}
    per_core = (simd.get("peak_gfma") or {}).get(simd.get("path"))
    threads = res["plan"]["threads"] if threads is None else threads
    return 2.0 * threads * per_core if per_core else None


def percent(part, whole):
    """100 x part / whole, as a table shows it (no decimals); None when either is missing."""
    r = ratio(part, whole)
    return None if r is None else num(100 * r, 0)


def ratio(a, b):
    return a / b if a is not None and b else None


# --- formatting ----------------------------------------------------------------------------


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join("–" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def section(title, intro, head, rows):
    """A report section: its heading, a paragraph on what it measures, its table."""
    return [f"## {title}", "", intro, "", table(head, rows), ""]


def num(x, digits=1):
    return None if x is None else f"{x:,.{digits}f}"


def ms(seconds, digits=1):
    return None if seconds is None else f"{seconds * 1e3:,.{digits}f}"


def times_x(r):
    return None if r is None else f"{r:.2f}x"


# --- the model ---------------------------------------------------------------------------------

DEFAULT_MODEL = "inception_v3"          # a report of it reads as it did before `--model` existed


def model_of(plan):
    """(registry name, title, "HxW") of the model the run measured (Inception v3 when unsaid)."""
    h, w = plan.get("input_size", (299, 299))
    return plan.get("model", DEFAULT_MODEL), plan.get("model_title", "Inception v3"), f"{h}x{w}"


# --- the report ------------------------------------------------------------------------------


def render(res):
    """The whole report, from the results dict built by `benchmarks.__main__`."""
    plan = res["plan"]
    model, title, size = model_of(plan)
    which = "" if model == DEFAULT_MODEL else f": {title}, {size}"
    out = [f"# pyincept benchmark{which}{' (quick smoke run: few repeats, no conclusions)' if plan['quick'] else ''}", "",
           "What each number means and how to read the ratios: `benchmarks/README.md`.", ""]
    out += header(res)
    out += headline(res)
    out += latency_section(res)
    out += throughput_section(res)
    out += memory_section(res)
    out += startup_section(res)
    out += gemm_section(res)
    out += accuracy_section(res)
    out += determinism_section(res)
    out += stages_section(res)
    out += scale_section(res)
    out += targets_section(res)
    if res["errors"]:
        out += ["## Errors", "", *[f"- {e}" for e in res["errors"]], ""]
    return "\n".join(out).rstrip() + "\n"


def header(res):
    m, v, plan = res["machine"], res["versions"], res["plan"]
    load0, load1 = res["loadavg_start"], res["loadavg_end"]
    installed = ", ".join(f"{k} {val}" for k, val in v.items() if val and k != "python")
    absent = [k for k, val in v.items() if not val]
    lines = [
        f"- **Command**: `{res['command']}`",
        f"- **Date**: {res['date']} (took {res['elapsed_s']:.0f} s)",
        f"- **Machine**: {m['cpu']}; {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable); "
        f"{num(m['ram_gib'])} GiB RAM; SIMD: {', '.join(m['flags']) or 'unknown'}; {m['os']}",
        f"- **Load average** (1, 5, 15 min, as `uptime` shows it): before the suite {_load(load0)}; at its end "
        f"{_load(load1)} (the suite's own {plan['threads']} threads add about {plan['threads']})" + (
            "  \n  **Busy machine: other processes shared these cores, so the numbers are noisy.**"
            if load0[0] > 0.5 or load1[0] > plan["threads"] + 0.5 else ""),
        f"- **Versions**: Python {v['python']}; {installed}" + (f"; not installed: {', '.join(absent)}" if absent else ""),
        f"- **pyincept source**: {res.get('source', 'unknown')}" + (
            f"; baseline: `{plan['baseline']}` = {res['baseline'].get('commit') or res['baseline'].get('error')}, "
            "its package extracted by `git archive` and timed in the same rounds" if plan.get("baseline") else ""),
        f"- **GEMM** (pyincept's own, `kernels/gemm.py`; its forward pass calls no BLAS): {gemm_line(res)}",
        f"- **numpy's BLAS** (not pyincept's: `np.matmul` in the matrix-product section runs on it): "
        f"{res.get('numpy_blas', 'unknown')}; {openblas_line(res)}",
        f"- **Threads**: {plan['threads']} for every engine (pyincept: PYINCEPT_NUM_THREADS, the only one it reads; "
        f"torch: set_num_threads, 1 inter-op; onnxruntime: intra_op_num_threads, inter_op 1, ORT_ENABLE_ALL); "
        f"OPENBLAS_NUM_THREADS, OMP_NUM_THREADS and MKL_NUM_THREADS are {plan['threads']} in every process too",
        f"- **Weights**: `random_parameters({plan['seed']})`, the same for every engine "
        f"(files: {', '.join(f'`{k}`' for k, note in res['prepared'].items() if 'failed' not in note)}); "
        "inputs: standard-normal NHWC images, moved to each engine's layout before the clock starts"
        + (f"; the aux heads ({', '.join(res['aux_left_out'])}) are left out of every engine's copy (none runs "
           "them at inference)" if res.get("aux_left_out") else ""),
        f"- **Method**: every measurement in a fresh process, one at a time; engines interleaved over "
        f"{plan['rounds']} round(s); times are medians of {_repeats(plan)} per round",
        "",
    ]
    skipped = [f"- **{e['label']}**: skipped, {e['skipped']}" for e in res["engines"].values() if e["skipped"]]
    if skipped:
        lines += ["Engines skipped:", "", *skipped, ""]
    return lines


def gemm_line(res):
    """Which micro-kernel pyincept ran and why, its measured peak per path, and the roof
    that every `% of FMA peak` divides by."""
    simd = res.get("simd")
    if not simd:
        return "not measured (the `simd` worker failed: see Errors)"
    path, forced, peaks = simd["path"], simd.get("forced"), simd["peak_gfma"]
    why = (f"forced by `PYINCEPT_SIMD={forced}`" if forced and forced.lower() != "auto" else
           f"the CPU's best ({f'PYINCEPT_SIMD={forced}' if forced else 'PYINCEPT_SIMD unset'})")
    per_path = ", ".join(f"{'**' if p == path else ''}{p} {num(g)} GFMA/s{'**' if p == path else ''}"
                         for p, g in peaks.items())
    threads = res["plan"]["threads"]
    line = (f"the **{path}** micro-kernel, {why}; its peak on one core, measured by `gemm.peak_gfma` on "
            f"L1-resident operands: {per_path}; so the FMA peak on {threads} thread(s), the roof of "
            f"`% of FMA peak`: 2 x {threads} x {num(peaks.get(path))} = {num(fma_peak(res))} GFLOP/s")
    note = simd_paths_note(simd["runnable"], res)
    return line + (f"  \n  {note}" if note else "")


def simd_paths_note(runnable, res=None):
    """One line on the fast SIMD paths this CPU has, and so whether `pyincept-avx2` is timed."""
    if "avx512" in runnable:
        ran = res is not None and "pyincept-avx2" in engines_run(res)
        return ("This CPU runs AVX-512 and AVX2: " + ("`pyincept (PYINCEPT_SIMD=avx2)` times the AVX2 micro-kernel "
                "beside the AVX-512 one." if ran else "`--engines pyincept-avx2` times the AVX2 micro-kernel too."))
    if "avx2" in runnable:
        return "This CPU has no AVX-512: the AVX2 path is the only fast path here."
    return "This CPU has no AVX2 with FMA: the generic path is the only one here."


def _load(avg):
    return ", ".join(f"{a:.2f}" for a in avg)


def _repeats(plan):
    return ", ".join(f"{r} at batch {b}" for b, r in zip(plan["batches"], plan["repeats"]))


def engines_run(res):
    return [name for name, e in res["engines"].items() if not e["skipped"]]


def stat(res, name, batch):
    return summary(res["times"].get(name, {}).get(batch))


def throughput(res, name, batch):
    s = stat(res, name, batch)
    return batch / s["median"] if s else None


def peak_rss(res, name):
    r = res["rss"].get(name)
    return r["peak_rss_mib"] if r else None


def big_batches(plan):
    return [b for b in plan["batches"] if b != 1]


def headline(res):
    plan = res["plan"]
    bigs = big_batches(plan)
    rss_b = plan["rss_batch"]
    head = ["engine", "batch-1 latency ms (median)", "min – max ms"] + [f"batch-{b} img/s" for b in bigs] + [
        f"peak RSS MiB (batch {rss_b}, alone)"]
    rows = []
    for name in engines_run(res):
        s = stat(res, name, 1)
        rows.append([res["engines"][name]["label"], ms(s and s["median"]),
                     s and f"{ms(s['min'])} – {ms(s['max'])}"] +
                    [num(throughput(res, name, b)) for b in bigs] + [num(peak_rss(res, name), 0)])
    out = ["## Headline", "", table(head, rows), ""]
    others = [n for n in engines_run(res) if n != "pyincept"]
    if "pyincept" in engines_run(res) and others:
        head = ["pyincept ÷ engine", "batch-1 latency (< 1 is better)"] + [
            f"batch-{b} throughput (> 1 is better)" for b in bigs] + ["peak RSS (< 1 is better)"]
        rows = []
        for name in others:
            lat = ratio(stat(res, "pyincept", 1) and stat(res, "pyincept", 1)["median"],
                        stat(res, name, 1) and stat(res, name, 1)["median"])
            rows.append([res["engines"][name]["label"], times_x(lat)] +
                        [times_x(ratio(throughput(res, "pyincept", b), throughput(res, name, b))) for b in bigs] +
                        [times_x(ratio(peak_rss(res, "pyincept"), peak_rss(res, name)))])
        out += [table(head, rows), ""]
    return out


def usage_cells(res, name, batch):
    """[cores busy, involuntary context switches per second] over the timed passes (all rounds)."""
    u = res["usage"].get(name, {}).get(batch)
    if not u or not u["wall_s"]:
        return [None, None]
    return [num(u["cpu_s"] / u["wall_s"], 2), num(u["involuntary_switches"] / u["wall_s"], 0)]


USAGE_NOTE = ("`cores busy` = the process's CPU seconds (all threads) ÷ wall seconds over the timed passes: "
              "at most the thread count; spinning thread pools count as busy. `invol. switches/s` = involuntary "
              "context switches per second: the kernel took a core from a thread that could still run. Other "
              "processes competing for the cores raise it, and so do an engine's own surplus threads and thread "
              "pools that wait by calling sched_yield, so compare it between runs of one engine.")


ROOFLINE_NOTE = ("`% of FMA peak` = GFLOP/s ÷ the machine's FMA peak on the threads used (the header's GEMM "
                 "line): how much of the cores' multiply-add rate the network turns into its counted MACs. An "
                 "engine that executes fewer multiply-adds than the count (Winograd's convolutions) can pass 100%.")


def latency_section(res):
    macs, roof = res["macs_per_image"], fma_peak(res)
    head = ["engine", "median ms", "min ms", "max ms", "samples", "GFLOP/s", "% of FMA peak", "÷ onnxruntime",
            "÷ torch eager", "cores busy", "invol. switches/s", "1-min load after"]
    rows = []
    for name in engines_run(res):
        s = stat(res, name, 1)
        if not s:
            continue
        g = gflops(macs, s["median"])
        rows.append([res["engines"][name]["label"], ms(s["median"]), ms(s["min"]), ms(s["max"]), s["n"], num(g),
                     percent(g, roof),
                     times_x(ratio(s["median"], _median(res, "ort", 1))),
                     times_x(ratio(s["median"], _median(res, "torch", 1)))] + usage_cells(res, name, 1) +
                    [" / ".join(f"{a:.1f}" for a in res["loadavg"].get(name, []))])
    return section("Latency, batch 1",
            f"One image at a time, {model_of(res['plan'])[2]}. Lower is better; ratios are this engine's median over the other's. "
            + ROOFLINE_NOTE + " " + USAGE_NOTE + " `1-min load after`: the load average when each round's process ended (the engine's own "
            "threads account for about the thread count of it).",
            head, rows)


def _median(res, name, batch):
    s = stat(res, name, batch)
    return s["median"] if s else None


def throughput_section(res):
    bigs = big_batches(res["plan"])
    if not bigs:
        return []
    macs, roof = res["macs_per_image"], fma_peak(res)
    head = ["engine", "batch", "ms per batch (median)", "min – max ms", "samples", "img/s", "GFLOP/s",
            "% of FMA peak", "÷ onnxruntime", "÷ torch eager", "cores busy", "invol. switches/s"]
    rows = []
    for b in bigs:
        for name in engines_run(res):
            s = stat(res, name, b)
            if not s:
                continue
            g = gflops(macs * b if macs else None, s["median"])
            rows.append([res["engines"][name]["label"], b, ms(s["median"]), f"{ms(s['min'])} – {ms(s['max'])}", s["n"],
                         num(b / s["median"]), num(g), percent(g, roof),
                         times_x(ratio(throughput(res, name, b), throughput(res, "ort", b))),
                         times_x(ratio(throughput(res, name, b), throughput(res, "torch", b)))] + usage_cells(res, name, b))
    return section("Throughput",
            "Images per second at a fixed batch. Higher is better; ratios are this engine's img/s over the other's. "
            "`% of FMA peak` as in the latency table.",
            head, rows)


def memory_section(res):
    if not res["rss"]:
        return ["## Peak memory", "", "Not measured in this run.", ""]
    b = res["plan"]["rss_batch"]
    head = ["engine", "RSS after loading MiB", "peak RSS MiB", "peak − loaded MiB", "pass s", "÷ onnxruntime", "÷ torch eager"]
    rows = []
    for name, r in res["rss"].items():
        rows.append([res["engines"][name]["label"], num(r["after_load_mib"], 0), num(r["peak_rss_mib"], 0),
                     num(r["peak_rss_mib"] - r["after_load_mib"], 0), num(r["seconds"], 2),
                     times_x(ratio(r["peak_rss_mib"], peak_rss(res, "ort"))),
                     times_x(ratio(r["peak_rss_mib"], peak_rss(res, "torch")))])
    return section("Peak memory",
            f"Each engine alone in a fresh process: load, one warm-up and one timed pass at batch {b}; "
            "peak = `ru_maxrss` (the process's high-water resident set, interpreter and libraries included). "
            "Lower is better.",
            head, rows)


def startup_section(res):
    cs = res["coldstart"]
    if not cs:
        return []
    head = ["Numba cache", "import pyincept s", "load weight file s", "first batch-1 forward s", "total s", "process wall s",
            "peak RSS MiB"]
    rows = [[key, num(r["import_s"], 3), num(r["load_s"], 3), num(r["first_forward_s"], 3), num(r["total_s"], 3),
             num(r["wall_s"], 3), num(r["peak_rss_mib"], 0)] for key, r in cs.items()]
    return section("Start-up (pyincept)",
            f"A fresh process: `import pyincept`, `{_builder(res['plan'])}`, one batch-1 forward. "
            "`total` is timed inside the process from before the import; `process wall` adds the interpreter's own "
            "start and exit. Warm: the second of two runs sharing a Numba cache. Cold: an empty `NUMBA_CACHE_DIR`, so "
            "every kernel compiles.",
            head, rows)


def _builder(plan):
    model = model_of(plan)[0]
    return "inception_v3(weights.npz)" if model == DEFAULT_MODEL else f'create_model("{model}", weights.npz)'


GEMM_LIBRARIES = {"numpy": "np.matmul", "torch": "torch.matmul"}     # else "pyincept <path>" as it is


def gemm_section(res):
    """One core's matrix product on the model's own shapes: pyincept's, numpy's, torch's,
    each as GFLOP/s and as a share of one core's FMA peak."""
    title = "Matrix product (one core)"
    g = res.get("gemm")
    if g and g.get("skipped"):
        return [f"## {title}", "", f"Not measured: {g['skipped']}.", ""]
    if not g or not g["shapes"]:
        return []
    model, name, size = model_of(res["plan"])
    own = "Inception v3's own GEMM shapes at batch 1" if model == DEFAULT_MODEL else (
        f"{name}'s own GEMM shapes at batch 1, {size}")
    libraries, roof = g["libraries"], fma_peak(res, threads=1)
    simd = res.get("simd") or {}
    first = libraries[0]
    head = ["GEMM", "M", "K", "N", f"{first} median ms"]
    for lib in libraries:
        head += [f"{GEMM_LIBRARIES.get(lib, lib)} GFLOP/s", "% of FMA peak"]
    rows = [[r["name"], r["M"], r["K"], r["N"], ms(r["median"][first], 2)] +
            [cell for lib in libraries for cell in (num(r["gflops"].get(lib)), percent(r["gflops"].get(lib), roof))]
            for r in g["shapes"]]
    kernel = " / ".join(map(str, simd.get("openblas") or ["?"]))
    paths = " and ".join(f"**{p}**" for p in g["paths"])
    peaks = ", ".join(f"{p} {num(v)} GFMA/s" for p, v in (simd.get("peak_gfma") or {}).items())
    return section(title,
            f"C = A @ B in float32 on one core, on {own} (M rows: output pixels; K depth: R·S·C; N: output "
            f"channels) and a square 2048³ for reference: pyincept's `gemm_into` on the {paths} micro-kernel"
            f"{'s' if len(g['paths']) > 1 else ''}, its weights packed into panels beforehand as at load; `np.matmul` "
            f"with numpy's BLAS held to one thread (threadpoolctl; OpenBLAS's {kernel} kernel)"
            + ("; `torch.matmul` at `torch.set_num_threads(1)`" if "torch" in libraries else "") +
            ". GFLOP/s = 2·M·K·N ÷ the median seconds. `% of FMA peak` = GFLOP/s ÷ one core's FMA peak, "
            f"2 x {num((simd.get('peak_gfma') or {}).get(simd.get('path')))} GFMA/s = **{num(roof)} GFLOP/s** for "
            f"the {simd.get('path', '?')} path pyincept ran. The micro-kernel's peak per path on this CPU: {peaks or '?'}.",
            head, rows)


def accuracy_section(res):
    acc = res["accuracy"]
    if not acc:
        return ["## Accuracy", "", "No other engine ran: nothing to compare pyincept's logits with.", ""]
    head = ["engine", "max abs logit", "max abs Δ vs pyincept", "Δ ÷ max abs logit", "top-1 equal"]
    rows = [[res["engines"][n]["label"], num(a["max_abs_logit"], 3), f"{a['max_abs_delta']:.2e}", f"{a['relative']:.2e}",
             "yes" if a["top1_equal"] else "no"] for n, a in acc.items()]
    return section("Accuracy",
            "The same 2 images through every engine; logits compared with pyincept's. The bar: "
            "Δ ≤ 1e-3 of the largest logit.",
            head, rows)


def determinism_section(res):
    d = res["determinism"]
    if not d:
        return []
    yes = lambda b: "yes" if b else "**no**"  # noqa: E731
    identical = d.get("alone_vs_batch_identical")
    return ["## Determinism (pyincept)", "",
            f"- Each of {d['batch']} images alone vs inside one batch of {d['batch']}: bit-for-bit identical: "
            f"{yes(identical)}" + ("" if identical else
                                   f" (max |Δ logit| = {d['alone_vs_batch_max_abs']:.2e}, "
                                   f"{d['alone_vs_batch_max_rel']:.2e} of the largest logit; top-1 equal: "
                                   f"{yes(d['top1_agree'])})") +
            f", on the {d.get('simd', '?')} micro-kernel. Every output of every matrix product is one FMA chain "
            "over its depth, in order (`kernels/gemm.py`), so an image's bits do not depend on the batch it sits in, "
            "nor on the tile or the thread that computes it.",
            f"- The same batch twice: bit-for-bit identical: {yes(d['batch_rerun_identical'])}; "
            f"the same single image twice: {yes(d['single_rerun_identical'])}.", ""]


def stages_section(res):
    L = res["layers"]
    if not L:
        return []
    stages = [(s, statistics.median(s["times"])) for s in L["stages"]]
    total = sum(t for _, t in stages)
    head = ["stage", "kind", "median ms", "% of time", "GMACs", "% of MACs", "GFLOP/s", "% of FMA peak"]
    all_macs, roof = sum(s["macs"] for s, _ in stages), fma_peak(res)
    rows = [[s["name"], s["kind"], ms(t, 2), num(100 * t / total), num(s["macs"] / 1e9, 3),
             num(100 * s["macs"] / all_macs), num(gflops(s["macs"], t)), percent(gflops(s["macs"], t), roof)]
            for s, t in stages]
    rows.append(["**sum of stages**", "", ms(total, 2), "100.0", num(all_macs / 1e9, 3), "100.0",
                 num(gflops(all_macs, total)), percent(gflops(all_macs, total), roof)])
    whole = statistics.median(L["whole_times"])
    aux = L.get("aux", ["AuxLogits"])                          # results from before --model: Inception v3's
    aux = f"{', '.join(aux)} not run" if aux else "the model holds no aux heads"
    return section("Where pyincept's time goes (batch 1)",
            f"Each stage of `model.stages` timed on its own, called one by one as `{L.get('network', 'Inception3')}.run` "
            f"calls them ({aux}), median of {len(L['whole_times'])}; `model(x)` end to end: {ms(whole)} ms. "
            f"MACs from `pyincept.summary.layer_table`. `% of FMA peak`: the stage's GFLOP/s ÷ the machine's FMA "
            f"peak on the {res['plan']['threads']} thread(s) used ({num(roof)} GFLOP/s, the header's GEMM line); "
            "a Winograd stage executes fewer multiply-adds than it counts, so it can pass 100%.",
            head, rows)


def scale_section(res):
    sc = res["scale"]
    if sc is None:
        return ["## Scale (pyincept)", "", "Skipped (`--no-scale`).", ""]
    if not sc["batch"] and not sc["size"]:
        return []
    out = ["## Scale (pyincept)", "",
           "Each point in a fresh process: load, one warm-up, then timed passes. "
           "`working MiB` = peak RSS − RSS after loading the model.", ""]
    head = ["batch", "ms per batch (median)", "ms per image", "img/s", "GFLOP/s", "peak RSS MiB", "working MiB",
            "working MiB per image"]
    rows = []
    for r in sc["batch"]:
        t, b = statistics.median(r["times"]), r["batch"]
        work = r["peak_rss_mib"] - r["after_load_mib"]
        rows.append([b, ms(t), ms(t / b), num(b / t), num(gflops(r["macs_per_image"] * b, t)), num(r["peak_rss_mib"], 0),
                     num(work, 0), num(work / b)])
    out += [f"By batch size, {res['plan']['scale_size']}x{res['plan']['scale_size']}:", "", table(head, rows), ""]
    head = ["input", "batch", "GMACs per image", "ms per batch (median)", "ms per image", "GFLOP/s", "peak RSS MiB",
            "working MiB"]
    rows = []
    for r in sc["size"]:
        t, b = statistics.median(r["times"]), r["batch"]
        rows.append([f"{r['size']}x{r['size']}", b, num(r["macs_per_image"] / 1e9, 2), ms(t), ms(t / b),
                     num(gflops(r["macs_per_image"] * b, t)), num(r["peak_rss_mib"], 0),
                     num(r["peak_rss_mib"] - r["after_load_mib"], 0)])
    out += ["By input size:", "", table(head, rows), ""]
    return out


# --- targets ---------------------------------------------------------------------------------


def size_cliff(res):
    """The worst step of the scale table's input sizes: the largest ratio of one size's time
    per multiply-add to the next smaller size's (1.0 or less: bigger inputs never cost more
    per MAC; issue 17 saw 499x499 slower per image than 599x599). None where not measured."""
    points = sorted((r["size"], statistics.median(r["times"]) / (r["batch"] * r["macs_per_image"]))
                    for r in ((res.get("scale") or {}).get("size") or []))
    steps = [b / a for (_, a), (_, b) in zip(points, points[1:])]
    return max(steps) if steps else None


def targets(res):
    """[(status, kind, text)]: status PASS / FAIL / SKIP (not measured in this run)."""
    out = []

    def check(kind, text, value, limit, higher_is_better=False, unit="x"):
        if value is None:
            out.append(("SKIP", kind, f"{text}: not measured in this run"))
            return
        ok = value >= limit if higher_is_better else value <= limit
        shown = f"{value:.2f}x" if unit == "x" else f"{value:.3g} {unit}"
        out.append(("PASS" if ok else "FAIL", kind, f"{text}: {shown}"))

    # Issue 24's targets. Inception v3 leads onnxruntime by a margin; GoogLeNet and the FID
    # network match its latency and lead its batch-8 throughput. A small model's resident
    # memory is mostly the interpreter's and Numba's, so GoogLeNet's peak is held to parity.
    model = model_of(res["plan"])[0]
    lead = model == DEFAULT_MODEL
    latency, speedup = (0.8, {8: 1.5, 32: 1.5}) if lead else (1.0, {8: 1.2, 32: 1.0})
    peak = 1.0 if model == "googlenet" else 0.5
    p_lat = _median(res, "pyincept", 1)
    check("required", f"batch-1 latency ≤ {latency}x onnxruntime", ratio(p_lat, _median(res, "ort", 1)), latency)
    check("required", "batch-1 latency ≤ 0.75x torch eager (NCHW)", ratio(p_lat, _median(res, "torch", 1)), 0.75)
    thr = {b: ratio(throughput(res, "pyincept", b), throughput(res, "ort", b)) if b in res["plan"]["batches"] else None
           for b in (8, 32)}
    for b in (8, 32):
        check("required", f"batch-{b} throughput ≥ {speedup[b]}x onnxruntime", thr[b], speedup[b], higher_is_better=True)
    rss = ratio(peak_rss(res, "pyincept"), peak_rss(res, "ort")) if res["plan"]["rss_batch"] == 32 else None
    check("required", f"peak RSS at batch 32 ≤ {peak}x onnxruntime's", rss, peak)
    if lead:                         # a small model's resident memory is mostly the interpreter's and Numba's
        loaded = {n: (res["rss"].get(n) or {}).get("after_load_mib") for n in ("pyincept", "ort")}
        check("required", "RSS after loading ≤ 1.0x onnxruntime's", ratio(loaded["pyincept"], loaded["ort"]), 1.0)
    check("required", "no cliff by size: time per multiply-add never rises more than 10% from one input size "
          "to the next", size_cliff(res), 1.10)
    warm = res["coldstart"].get("warm")
    check("required", "warm-cache start-up (import, load, first forward) ≤ 1.5 s", warm and warm["total_s"], 1.5, unit="s")
    acc = res["accuracy"].get("torch")
    check("required", "pyincept vs torchvision logits: max |Δ| ≤ 1e-3 of max |logit|", acc and acc["relative"], 1e-3,
          unit="of max |logit|")
    return out


def targets_section(res):
    lines = [f"- **{status}** ({kind}) {text}" for status, kind, text in targets(res)]
    return ["## Targets", "",
            "Informational: the exit status never depends on these.", "", *lines, ""]


def finish(lines, errors, out=None):
    """A separate suite's end (metrics.py, backward.py): its errors listed, the Markdown to
    stdout and to `out`; exit status 1 when a measurement failed."""
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errors]
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)
    return 1 if errors else 0

