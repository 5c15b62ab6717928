"""Static check of the Triton kernels for an H200 (sm_90) on a machine without a GPU.

    python tools/kernel_static.py                                  # every variant, bits 2/3/4, all buckets
    python tools/kernel_static.py --kernels splitk --shapes 4096x11008 --bits 4 --tokens 1
    python tools/kernel_static.py --calibrate benchmarks/h200-2026-11-27b/kernel.json --out rows.jsonl

Each row of ``VARIANTS`` is one kernel launch as the dispatcher makes it (constexprs, num_warps, grid,
pointer roles) for a (bits, tokens, K x N) case with group 128 and k = 128 FP16 columns. The tool
compiles it for sm_90 (``triton.compile`` on an ``ASTSource``), reruns the wheel's ``ptxas -v``, reads
the SASS and prints one JSON line per (kernel, bits, token bucket, shape): registers, spills, shared
memory, load widths per role, the main loop's instructions per weight byte, programs per SM and the
predicted share of copy bandwidth.

The model (per call; constants below; stated also in docs/kernel_notes.md):
- ``t_mem``   = bytes / 4.2 TB/s: the layer's bytes (packed base, scales, zeros, FP16 columns, x, y, as
  in tools/bench_kernel.py) at the H200's measured copy bandwidth (read + write);
- ``t_issue`` = warp-instructions of the busiest SM / (1.0e12 / 132 per s), scaled down when it holds
  fewer than 4 warps (one per scheduler). Instructions per program: each loop's SASS body times its
  iterations (weight bytes the program loads / weight bytes per iteration), plus the code outside
  loops once;
- ``t_lat``   = latency bound (Little's law): each warp waits ``E`` times per iteration of its main
  loop for a DRAM load it issued (``kernel_sass.exposures``: 1 for a load of the same iteration,
  1/(j+1) for one issued j iterations ahead), each wait ~1000 cycles at 1.98 GHz. So one SM keeps
  ``warps * weight bytes per iteration / E`` weight bytes in flight, and
  ``t_lat = weight bytes of the busiest SM * E * latency / (resident warps * bytes per iteration)``;
- ``t = 2 us launch + max(t_mem, t_issue, t_lat)``; ``predicted_bw_share = (bytes / 4.2 TB/s) / t``,
  the quantity tools/bench_kernel.py reports as "% copy bw".
Residency: the busiest SM runs ceil(programs / 132) programs, at most as many at once as registers
(64 K per SM), shared memory (227 KiB) and 64 warps allow. Waits on loads of what every program reads
(x, gchunk, perm, bias) are taken as cache hits: no exposure.
``--calibrate kernel.json`` adds the measured time of the same case and the ratio measured/predicted.

Adding a kernel: one ``Variant`` row in ``VARIANTS`` and, next to it, its launch function (Case -> Launch:
every kernel parameter as ``Ptr(dtype, bytes)``, int or constexpr value, the grid, warps and stages,
how often the call reads each weight byte) and the roles of its pointers. Nothing else changes.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_sass import KernelSpecError, Ptr, analyze_kernel

SMS = 132
CLOCK_HZ = 1.98e9
ISSUE_RATE = 1.0e12          # warp-instructions per second, whole GPU (132 SMs x 4 schedulers x ~1.9 GHz)
LATENCY_CYCLES = 1000        # DRAM load latency under load
COPY_BW = 4.2e12             # bytes/s, device-to-device copy (read + write), measured on the H200
LAUNCH_S = 2e-6
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM, SMEM_PER_SM = 65536, 64, 32, 227 * 1024
GROUP, K_SAL = 128, 128
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))   # K x N
TOKENS = (1, 4, 16, 64)
BITS = (2, 3, 4)


@dataclass(frozen=True)
class Case:
    """One layer call: K x N, bits, tokens; group 128, k FP16 columns, act-order off (fp16)."""
    K: int
    N: int
    bits: int
    tokens: int
    group: int = GROUP
    k: int = K_SAL

    @property
    def Np(self):
        return -(-self.N // 16) * 16

    @property
    def chunks(self):
        return max(1, self.groups * self.group // 32)  # every group padded to group rows (kernels.triton.layout)

    @property
    def groups(self):
        return -(-self.K // self.group)

    @property
    def tile(self):
        """Chunks per tile (kernels.triton.layout._tile_for): the largest power of two <= 8 dividing group / 32."""
        t = 8
        while (self.group // 32) % t:
            t //= 2
        return t

    @property
    def tiles(self):
        return self.chunks // self.tile

    @property
    def kp(self):
        return -(-self.k // 32) * 32

    def layout_bytes(self) -> dict:
        """Bytes of each layout tensor (gift_quant.kernels.triton.layout; what TritonLayout.nbytes counts)."""
        return {"qweight": self.chunks * self.bits * self.Np * 4, "scales": self.groups * self.Np * 2,
                    "zeros": self.groups * self.Np, "sal_w": self.kp * self.Np * 2, "sal_idx": self.kp * 4,
                    "perm": self.chunks * 32 * 4, "gchunk": self.chunks * 4, "x": self.tokens * self.K * 2,
                    "y": self.tokens * self.N * 2, "wt": self.K * self.Np * 2}

    def read_bytes(self) -> int:
        """The bytes tools/bench_kernel.py divides by: L.nbytes() (base, scales, zeros, FP16 columns) + x + y."""
        b = self.layout_bytes()
        return b["qweight"] + b["scales"] + b["zeros"] + self.k * self.Np * 2 + self.k * 4 + b["x"] + b["y"]


@dataclass
class Launch:
    args: dict                 # every kernel parameter by name: Ptr, int or constexpr value
    grid: tuple
    num_warps: int
    num_stages: int = 3        # Triton's default on CUDA
    weight_reads: int = 1      # how often the call loads each weight byte (GEMV: once per token)
    reload: dict = field(default_factory=dict)  # weight pointer -> bytes loaded per byte of it (L1 duplicates)
    bytes: int = 0             # bytes the call moves (for t_mem and the share); default Case.read_bytes()


@dataclass
class Variant:
    name: str
    module: str                       # under gift_quant.kernels
    kernel: str                       # the @triton.jit function
    launch: Callable[..., Launch]     # (module, case, config=None) -> the dispatcher's launch (config: a
                                      # tile override, as in tools/bench_kernel.py's sweep)
    routed: Callable[[int], bool]     # token counts the dispatcher sends here (default settings)
    roles: dict                       # pointer parameter -> weight | meta | cached | x (loads from others: 'other')
    bench_key: str | None = None      # field of tools/bench_kernel.py's JSON row with this path's time
    swept: bool = False               # bench_kernel's tile sweep (its "sweep" rows) times this kernel
    plus_fp16: bool = False           # the path also runs the fp16 GEMM (dequant + cuBLAS)
    note: str = ""
    extra: dict = field(default_factory=dict)


def _gemv_max_tokens() -> int:
    return _kmod("triton.op").GEMV_MAX_TOKENS


# ---------------------------------------------------------------- the kernels (triton_kernel.py)
# Pointer dtypes of the layout (fp16 activations) and the roles of loads. The split-K workspace and
# arrival counters are read back by the last program of a column block only (L2: 'cached').
_MIXED_ROLES = {"qw_ptr": "weight", "sw_ptr": "weight", "s_ptr": "meta", "z_ptr": "meta",
                "gch_ptr": "cached", "perm_ptr": "cached", "si_ptr": "cached", "b_ptr": "cached",
                "ws_ptr": "cached", "lock_ptr": "cached", "x_ptr": "x"}
_CPU = None  # splitk_config's device: a CPU device stands for the H200's 132 SMs


def _device():
    global _CPU
    if _CPU is None:
        import torch
        _CPU = torch.device("cpu")
    return _CPU


def _mixed_ptrs(c: Case, out_bytes: int) -> dict:
    b = c.layout_bytes()
    return {"x_ptr": Ptr("fp16", b["x"]), "qw_ptr": Ptr("i32", b["qweight"]), "perm_ptr": Ptr("i32", b["perm"]),
                "gch_ptr": Ptr("i32", b["gchunk"]), "s_ptr": Ptr("fp16", b["scales"]), "z_ptr": Ptr("u8", b["zeros"]),
                "sw_ptr": Ptr("fp16", b["sal_w"]), "si_ptr": Ptr("i32", b["sal_idx"]), "b_ptr": Ptr("fp16", c.N * 2),
                "y_ptr": Ptr("fp16", out_bytes)}


def _mixed_ints(c: Case) -> dict:
    return {"M": c.tokens, "K": c.K, "N": c.N, "Np": c.Np, "C": c.chunks, "KS": c.kp,
            "stride_xm": c.K, "stride_ym": c.N}


def _splitk_args(tm, c: Case, config: dict | None):
    """splitk(): the config, kernel parameters and grid of one call of up to SPLITK_MAX_TOKENS tokens."""
    m = min(c.tokens, tm.SPLITK_MAX_TOKENS)
    cfg = {**tm.splitk_config(m, c.Np, c.tiles, c.tile, _device()), **(config or {})}
    MB = max(16, cfg["MB"]) if cfg["KERNEL"] == "dot" else cfg["MB"]
    blocks = math.ceil(c.Np / cfg["BN"])
    split, atomic = cfg["SPLIT"], bool(cfg["ATOMIC"])
    ptrs = _mixed_ptrs(c, m * c.N * 2)
    del ptrs["gch_ptr"]
    ptrs["x_ptr"] = Ptr("fp16", m * c.K * 2)
    ptrs["perm_ptr"] = Ptr("i32", c.chunks * 32 * 4)  # perm_pos: input feature of each position
    ptrs["ws_ptr"] = Ptr("fp32", (1 if atomic else split) * MB * c.Np * 4)
    ptrs["lock_ptr"] = Ptr("i32", blocks * 4)
    ts = c.kp // (c.tile if cfg["KERNEL"] == "fma" else 32)
    args = {**ptrs, "M": m, "K": c.K, "N": c.N, "Np": c.Np, "T": c.tiles, "TPG": c.group // (32 * c.tile),
            "TS": ts, "stride_xm": c.K, "stride_ym": c.N, "BITS": c.bits, "W": c.tile, "BN": cfg["BN"], "MB": MB,
            "SPLIT": split, "IDENTITY": True, "EVEN_K": c.K == c.chunks * 32, "HAS_BIAS": False, "ATOMIC": atomic,
            "STAGES": cfg["STAGES"]}
    if cfg["KERNEL"] == "dot":
        args["IEEE"] = False
    calls = math.ceil(c.tokens / m)
    return cfg, args, (blocks, split), calls


def _splitk(tm, c: Case, config: dict | None = None) -> Launch:
    """splitk() at 1 token: _splitk_kernel (CUDA cores), grid (Np / BN, SPLIT); each weight byte read once;
    the cross-split reduction is the last program of each column block (no separate pass)."""
    cfg, args, grid, calls = _splitk_args(tm, c, config)
    return Launch(args, grid, cfg["num_warps"], weight_reads=calls)


def _splitk_dot(tm, c: Case, config: dict | None = None) -> Launch:
    """splitk() at 2-16 tokens: _splitk_dot_kernel (tl.dot on a 16-row x tile), grid (Np / BN, SPLIT).
    Each row of the [32*W, BN] code tile loads its word: 32/bits loads per word (3 bits: 64/3)."""
    cfg, args, grid, calls = _splitk_args(tm, c, config)
    reload = {"qw_ptr": 64 / 3 if c.bits == 3 else 32 / c.bits}
    return Launch(args, grid, cfg["num_warps"], weight_reads=calls, reload=reload)


def _gemm(tm, c: Case, config: dict | None = None) -> Launch:
    """mixed_linear(path='gemm'): grid (tokens / BM, Np / BN)."""
    cfg = {**tm.gemm_config(c.tokens, c.N), **(config or {})}
    args = {**_mixed_ptrs(c, c.layout_bytes()["y"]), **_mixed_ints(c), "BITS": c.bits, "BM": cfg["BM"],
            "BK": cfg["BK"], "BN": cfg["BN"], "IDENTITY": True, "HAS_BIAS": False, "IEEE": False, "TW": c.tile}
    grid = (math.ceil(c.tokens / cfg["BM"]), math.ceil(c.Np / cfg["BN"]))
    # every row of a [BK, BN] tile loads its code's word: 32 loads per chunk of `bits` words (3 bits: 32 of
    # the 2-bit planes + 32 of the high plane per 3 words)
    reload = {"qw_ptr": 64 / 3 if c.bits == 3 else 32 / c.bits}
    return Launch(args, grid, cfg["num_warps"], weight_reads=grid[0], reload=reload)


def _dequant(tm, c: Case, config: dict | None = None) -> Launch:
    """dequantize_t: grid (C / W, Np / BN) with W = 4, BN = 128 (fixed in the source), 4 warps; writes W^T."""
    W, BN = (config or {}).get("W", 4), (config or {}).get("BN", 128)
    b = c.layout_bytes()
    args = {"qw_ptr": Ptr("i32", b["qweight"]), "perm_ptr": Ptr("i32", b["perm"]), "gch_ptr": Ptr("i32", b["gchunk"]),
                "s_ptr": Ptr("fp16", b["scales"]), "z_ptr": Ptr("u8", b["zeros"]), "w_ptr": Ptr("fp16", b["wt"]),
                "K": c.K, "Np": c.Np, "C": c.chunks, "BITS": c.bits, "W": W, "BN": BN, "IDENTITY": True,
                "TW": c.tile}
    return Launch(args, (math.ceil(c.chunks / W), math.ceil(c.Np / BN)), 4,
                  bytes=b["qweight"] + b["scales"] + b["zeros"] + b["wt"])


VARIANTS = [
    Variant("splitk", "triton.kernel", "_splitk_kernel", _splitk, lambda t: t == 1, _MIXED_ROLES,
            bench_key="us_triton_gemv", swept=True, note="decode, 1 token: split-K on CUDA cores"),
    Variant("splitk_dot", "triton.kernel", "_splitk_dot_kernel", _splitk_dot,
            lambda t: 1 < t <= _gemv_max_tokens(), _MIXED_ROLES, bench_key="us_triton_gemv",
            note="decode, 2-16 tokens: split-K on tensor cores (tl.dot)"),
    Variant("dequant", "triton.kernel", "_dequant_kernel", _dequant, lambda t: t > _gemv_max_tokens(),
            _MIXED_ROLES, bench_key="us_triton_dequant", plus_fp16=True,
            note="prefill default: W^T written once, then the fp16 GEMM"),
    Variant("gemm", "triton.kernel", "_gemm_kernel", _gemm, lambda t: t > _gemv_max_tokens(), _MIXED_ROLES,
            bench_key="us_triton_gemm", note="prefill opt-in (GIFT_QUANT_TRITON_PREFILL=gemm, or a tuned table)"),
]


# ---------------------------------------------------------------- imports

def _kmod(name: str):
    """gift_quant.kernels.<name> without the package's __init__ (it imports transformers: seconds)."""
    full = f"gift_quant.kernels.{name}"
    if full in sys.modules:
        return sys.modules[full]
    if "gift_quant" not in sys.modules:
        stub = types.ModuleType("gift_quant")
        stub.__path__ = [str(ROOT / "gift_quant")]
        sys.modules["gift_quant"] = stub
    return importlib.import_module(full)


# ---------------------------------------------------------------- model

def occupancy(regs: int, shared: int, warps: int) -> int:
    """Programs one SM can hold at once (registers allocated per warp in units of 256)."""
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (per_warp * warps)
    by_smem = SMEM_PER_SM // (shared + 1024) if shared else MAX_BLOCKS_PER_SM
    return max(0, min(by_regs, by_smem, MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM))


def predict(c: Case, launch: Launch, st: dict) -> dict:
    """The model of the module docstring on one compiled launch and its SASS statistics ``st``."""
    programs = math.prod(launch.grid)
    warps = launch.num_warps
    occ = occupancy(st["registers"], st["shared_bytes"], warps)
    per_sm = math.ceil(programs / SMS)
    conc = max(1, min(per_sm, occ))
    resident = conc * warps
    size = {n: v.nbytes * launch.weight_reads for n, v in launch.args.items() if isinstance(v, Ptr)}

    def unique(lp):  # weight bytes per warp and iteration, duplicates removed
        return sum(b / launch.reload.get(n, 1) for n, b in lp["tensor_bytes_per_warp"].items())
    # instructions per warp of one program: each loop times its iterations, the code outside loops once
    instr_warp = st["straight_instr"]
    for lp in st["loops"]:
        if lp["tensor_bytes_per_warp"]:
            iters = sum(size.get(n, 0) for n in lp["tensor_bytes_per_warp"]) / programs / warps / unique(lp)
            instr_warp += iters * lp["instr"]
        else:
            instr_warp += lp["instr"]
    issue_rate_sm = ISSUE_RATE / SMS * min(1.0, resident / 4)
    t_issue = per_sm * warps * instr_warp / issue_rate_sm
    main = st["main"]
    lat = LATENCY_CYCLES / CLOCK_HZ
    ipb = inflight = None
    t_lat = 0.0
    if main:
        ipb = main["instr"] / unique(main)
        if main["exposures"] > 0:
            inflight = resident * unique(main) / main["exposures"]
            wb_prog = sum(size.get(n, 0) for n in main["tensor_bytes_per_warp"]) / programs
            t_lat = per_sm * wb_prog * lat / inflight
    nbytes = launch.bytes or c.read_bytes()
    t_mem = nbytes / COPY_BW
    terms = {"mem": t_mem, "issue": t_issue, "latency": t_lat}
    bound = max(terms, key=terms.get)
    t = LAUNCH_S + terms[bound]
    return {"instr_per_weight_byte": None if ipb is None else round(ipb, 3), "programs": programs,
                "programs_per_sm": round(programs / SMS, 2), "occupancy_programs_per_sm": occ,
                "resident_warps_per_sm": resident,
                "bytes_in_flight_per_sm": None if inflight is None else round(inflight),
                "t_mem_us": round(t_mem * 1e6, 2), "t_issue_us": round(t_issue * 1e6, 2),
                "t_lat_us": round(t_lat * 1e6, 2),
                "bound": bound, "predicted_us": round(t * 1e6, 2), "bytes": nbytes,
                "predicted_bw_share": round(nbytes / COPY_BW / t, 3)}


def load_bench(path: str):
    """({(K, N, bits, batch): row}, sweep rows) of a tools/bench_kernel.py JSON file (rows carry the run's
    copy bandwidth; sweep rows: the GEMV at 1 token with other tiles)."""
    with open(path) as f:
        d = json.load(f)
    bw = d["meta"].get("copy_bw_GBs")
    rows = {(r["K"], r["N"], r["bits"], r["batch"]): {**r, "copy_bw_GBs": bw} for r in d["rows"]}
    return rows, d.get("sweep") or []


def calibrate(v: Variant, c: Case, row: dict | None, pred: dict) -> dict:
    if not row or not v.bench_key or row.get(v.bench_key) is None:
        return {}
    fp16 = row["us_fp16"]
    measured = row[v.bench_key]  # the whole path (for dequant: the dequant pass + the fp16 GEMM)
    predicted = pred["predicted_us"] + (fp16 if v.plus_fp16 else 0.0)
    out = {"measured_us": round(measured, 2), "predicted_path_us": round(predicted, 2),
               "measured_over_predicted": round(measured / predicted, 2), "fp16_us": round(fp16, 2),
               "measured_x_fp16": round(fp16 / measured, 2), "predicted_x_fp16": round(fp16 / predicted, 2)}
    if not v.plus_fp16:
        bw = row["copy_bw_GBs"] * 1e9 if row.get("copy_bw_GBs") else COPY_BW
        out["measured_bw_share"] = round(c.read_bytes() / (measured * 1e-6) / bw, 3)
    return out


MD_COLUMNS = (("kernel", "kernel"), ("bits", "bits"), ("tokens", "tokens"), ("shape", "K x N"),
              ("registers", "regs"), ("spills", "spills"), ("shared_bytes", "smem B"),
              ("weight_ldg_128_share", "weight bytes by 128-bit loads"), ("x_ldg_vector_share", "x vector loads"),
              ("instr_per_weight_byte", "instr / weight byte"), ("exposures_per_iter", "waits / iter"),
              ("programs_per_sm", "programs / SM"), ("bytes_in_flight_per_sm", "bytes in flight / SM"),
              ("bound", "bound"), ("predicted_us", "predicted us"), ("predicted_bw_share", "predicted share"),
              ("measured_bw_share", "measured share"), ("measured_over_predicted", "measured / predicted"))


def markdown(rows: list) -> str:
    """The rows as a markdown table (docs/kernel_notes.md); '-' where a field does not apply."""
    def cell(v):
        return "-" if v is None else str(v)
    head = "| " + " | ".join(t for _, t in MD_COLUMNS) + " |\n|" + "---|" * len(MD_COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(cell(r.get(k)) for k, _ in MD_COLUMNS) + " |\n" for r in rows)


def _row(v: Variant, fn, c: Case, launch: Launch, st: dict, bench_row, triton_version: str) -> dict:
    """One JSON line: the case, the compiled kernel's statistics, the model and (optionally) the device."""
    pred = predict(c, launch, st)
    main = st["main"]
    return {"kernel": v.name, "bits": c.bits, "tokens": c.tokens, "shape": f"{c.K}x{c.N}", "group": c.group,
            "k": c.k, "routed": v.routed(c.tokens), "triton": triton_version, "ptxas": st["ptxas"],
            "constexprs": {p.name: launch.args[p.name] for p in fn.params if p.is_constexpr},
            "num_warps": launch.num_warps, "num_stages": launch.num_stages, "grid": list(launch.grid),
            "registers": st["registers"], "spills": st["spill_stores"] + st["spill_loads"],
            "shared_bytes": st["shared_bytes"], "cp_async": st["cp_async"],
            "weight_ldg_128_share": st["weight_128_share"], "main_weight_ldg_128_share": st["main_weight_128_share"],
            "x_ldg_vector_share": st["x_vector_share"], "load_widths": st["load_widths"],
            "main_loop_instr": main["instr"] if main else None,
            "exposures_per_iter": main["exposures"] if main else None,
            **pred, **calibrate(v, c, bench_row, pred)}


def _sweep(a, names, sweep, bench, shapes, bitss, cache, triton_version) -> list:
    """The model on each tile of bench_kernel's sweep; says how often it ranks the measured-best tile first."""
    out = []
    for v in (v for v in VARIANTS if v.name in names and v.swept):
        mod = _kmod(v.module)
        fn = getattr(mod, v.kernel)
        for e in sweep:
            if (e["K"], e["N"]) not in shapes or e["bits"] not in bitss or "us" not in e:
                continue  # another shape, or a tile that failed on the device
            c = Case(e["K"], e["N"], e["bits"], 1)
            launch = v.launch(mod, c, e["config"])
            st = analyze_kernel(fn, launch.args, launch.num_warps, launch.num_stages, v.roles, cache)
            base = bench.get((c.K, c.N, c.bits, 1), {})
            row = {**base, v.bench_key: e["us"]} if base else None
            r = {"sweep_config": e["config"], **_row(v, fn, c, launch, st, row, triton_version)}
            print(json.dumps(r), flush=True)
            out.append(r)
        best = {}
        for r in out:
            best.setdefault((r["shape"], r["bits"]), []).append(r)
        hits = sum(min(g, key=lambda r: r["predicted_us"]) is min(g, key=lambda r: r["measured_us"])
                   for g in best.values() if all("measured_us" in r for r in g))
        print(f"kernel_static: sweep: the model ranks the measured-fastest tile first in {hits} of {len(best)} "
              f"(shape, bits) cases", file=sys.stderr)
        _summary([{**r, "kernel": r["kernel"] + " sweep"} for r in out])
    return out


def _write(path: str, text: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _summary(rows: list):
    """measured / predicted per (kernel, bound) on stderr: how far the model is from the device."""
    groups = {}
    for r in rows:
        if "measured_over_predicted" in r:
            groups.setdefault((r["kernel"], r["bound"]), []).append(r["measured_over_predicted"])
    for (k, b), v in sorted(groups.items()):
        v.sort()
        print(f"kernel_static: {k} ({b}-bound, {len(v)} rows): measured/predicted {v[0]:.2f}-{v[-1]:.2f}, "
              f"median {v[len(v) // 2]:.2f}", file=sys.stderr)


# ---------------------------------------------------------------- CLI

def _parse_list(s: str, cast, what: str):
    try:
        return tuple(cast(x) for x in s.split(",") if x)
    except ValueError:
        _die(f"--{what}: cannot read {s!r}")


def _shape(s: str):
    k, _, n = s.partition("x")
    return int(k), int(n)


def _die(msg: str):
    print(f"kernel_static: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default=",".join(v.name for v in VARIANTS))
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--tokens", default="1,4,16,64")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="K x N list")
    ap.add_argument("--all-tokens", action="store_true",
                    help="every variant at every token count, not only where the dispatcher routes it")
    ap.add_argument("--calibrate", help="a tools/bench_kernel.py JSON (H200) to compare with")
    ap.add_argument("--out", help="also write the JSON lines to this file (atomic)")
    ap.add_argument("--md", help="also write a markdown table of the rows to this file")
    ap.add_argument("--sweep-out", help="also model the --calibrate file's tile sweep (GEMV tiles at 1 token) and "
                                        "write those rows to this file")
    a = ap.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: the real compiler, not the interpreter
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.6's default (3.9 warns when unset)
    names = a.kernels.split(",")
    unknown = [n for n in names if n not in {v.name for v in VARIANTS}]
    if unknown:
        _die(f"unknown kernel(s) {unknown}; known: {', '.join(v.name for v in VARIANTS)}")
    bitss = _parse_list(a.bits, int, "bits")
    if any(b not in (2, 3, 4, 8) for b in bitss):
        _die(f"--bits must be among 2,3,4,8, got {a.bits}")
    tokens = _parse_list(a.tokens, int, "tokens")
    shapes = _parse_list(a.shapes, _shape, "shapes")
    if any(t < 1 for t in tokens) or any(k < 1 or n < 1 for k, n in shapes):
        _die("--tokens and --shapes must be positive")
    bench, sweep = {}, []
    if a.sweep_out and not a.calibrate:
        _die("--sweep-out needs --calibrate (the sweep comes from that file)")
    if a.calibrate:
        try:
            bench, sweep = load_bench(a.calibrate)
        except (OSError, ValueError, KeyError) as e:
            _die(f"--calibrate {a.calibrate}: {e}")
    try:
        import triton
    except ImportError:
        _die("triton is not installed")
    lines, cache, failed, warned, t0 = [], {}, [], set(), time.time()
    for v in (v for v in VARIANTS if v.name in names):
        mod = _kmod(v.module)
        fn = getattr(mod, v.kernel)
        for (K, N) in shapes:
            for bits in bitss:
                for t in tokens:
                    if not (a.all_tokens or v.routed(t)):
                        continue
                    c = Case(K, N, bits, t)
                    launch = v.launch(mod, c)
                    try:
                        st = analyze_kernel(fn, launch.args, launch.num_warps, launch.num_stages, v.roles, cache)
                    except KernelSpecError as e:
                        _die(f"{v.name}: {e}")
                    except Exception as e:  # noqa: BLE001  (a compile or tool failure: report, go on)
                        failed.append(f"{v.name} {bits}-bit {t} tokens {K}x{N}")
                        print(f"kernel_static: error: {failed[-1]}: {type(e).__name__}: {str(e)[:500]}",
                              file=sys.stderr)
                        continue
                    if st["unattributed"] and id(st) not in warned:  # once per compiled kernel
                        warned.add(id(st))
                        print(f"kernel_static: warning: {v.name}: {st['unattributed']} global loads not tied to one "
                              "pointer of the variant's roles (role 'other', left out of the model)", file=sys.stderr)
                    line = json.dumps(_row(v, fn, c, launch, st, bench.get((K, N, bits, t)), triton.__version__))
                    print(line, flush=True)
                    lines.append(line)
    if a.sweep_out:
        swept = _sweep(a, names, sweep, bench, shapes, bitss, cache, triton.__version__)
        _write(a.sweep_out, "".join(json.dumps(r) + "\n" for r in swept))
    if not lines:
        print("kernel_static: warning: no (kernel, bits, tokens, shape) selected; try --all-tokens", file=sys.stderr)
    if a.out:
        _write(a.out, "".join(x + "\n" for x in lines))
    if a.md:
        _write(a.md, markdown([json.loads(x) for x in lines]))
    if bench:
        _summary([json.loads(x) for x in lines])
    print(f"kernel_static: {len(lines)} rows, {len(cache)} compilations, {time.time() - t0:.0f} s",
          file=sys.stderr)
    if failed:
        print(f"kernel_static: {len(failed)} case(s) failed, no row for them: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
