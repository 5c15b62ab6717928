"""Compile one Triton kernel for sm_90 without a GPU and read its SASS (helper of ``kernel_static.py``).

- :func:`specialize` turns launch arguments into the ``signature``/``constexprs``/``attrs`` of a
  ``triton.compiler.ASTSource`` with the rules of Triton's launcher (the only Triton-specific part);
- :func:`compile_sm90` compiles it, reruns the wheel's ``ptxas -v`` on the PTX (spills) and reads the
  cubin's resources (``cuobjdump -res-usage``) and SASS with source lines (``nvdisasm --print-line-info``:
  the same instructions as ``cuobjdump -sass``, plus the source line that ties each load to its pointer);
- :func:`analyze` finds loops (a backward ``BRA``), classifies every global load by role and width and
  counts, per loop iteration, how often a warp must wait for a DRAM load it issued (latency exposures).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

ARCH = "sm_90a"  # what Triton builds for capability 90


@dataclass(frozen=True)
class Ptr:
    """A pointer argument: Triton element type ('fp16', 'i32', 'u8', ...) and the bytes of its tensor."""
    dtype: str
    nbytes: int = 0


class KernelSpecError(ValueError):
    pass


def specialize(fn, args: dict):
    """(signature, constexprs, attrs) for ``ASTSource`` from ``args`` (every kernel parameter by name).

    Triton's launcher rules: pointers are 16-byte aligned (torch allocations are); an int parameter
    without ``do_not_specialize`` equal to 1 becomes the constant 1 and one divisible by 16 gets
    ``tt.divisibility`` 16; ints are i32 unless they need 64 bits.
    """
    params = getattr(fn, "params", None)
    if params is None:
        raise KernelSpecError(f"{fn!r} is not a @triton.jit function")
    names = [p.name for p in params]
    missing = [n for n in names if n not in args]
    extra = [n for n in args if n not in names]
    if missing or extra:
        raise KernelSpecError(f"{fn.__name__}: arguments missing {missing}, unknown {extra}")
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(params):
        v = args[p.name]
        if p.is_constexpr:
            sig[p.name], const[(i,)] = "constexpr", v
        elif isinstance(v, Ptr):
            sig[p.name] = "*" + v.dtype
            if not getattr(p, "do_not_specialize_on_alignment", False):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[p.name] = "u1"
        elif isinstance(v, int):
            if not p.do_not_specialize and v == 1:
                sig[p.name], const[(i,)] = "constexpr", 1
                continue
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if not p.do_not_specialize and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise KernelSpecError(f"{fn.__name__}: argument {p.name}={v!r} is not a Ptr, int or float")
    return sig, const, attrs


def tool_dir() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _run(cmd, **kw):
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, **kw)


def ptxas_v(ptx: str):
    """(tool name, ptxas -v text) with the first ptxas of the wheel that accepts this PTX for sm_90a."""
    bins = [os.environ["TRITON_PTXAS_PATH"]] if os.environ.get("TRITON_PTXAS_PATH") else []
    bins += [os.path.join(tool_dir(), n) for n in ("ptxas", "ptxas-blackwell")]
    errors = []
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for b in bins:
            if not os.path.exists(b):
                continue
            r = _run([b, f"-arch={ARCH}", "-v", src, "-o", os.path.join(d, "k.cubin")])
            if r.returncode == 0:
                return os.path.basename(b), r.stdout + r.stderr
            errors.append(f"{os.path.basename(b)}: {r.stderr.strip().splitlines()[-1:]}")
    raise RuntimeError("no ptxas accepted the PTX: " + "; ".join(errors or ["no ptxas in " + tool_dir()]))


@dataclass
class Compiled:
    name: str
    ptxas: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int          # Triton's shared memory per program (the cubin adds 1 KiB reserved on sm_90)
    sass: list = field(default_factory=list)   # [Instr]


@dataclass
class Instr:
    addr: int
    pred: str
    op: str
    operands: str
    line: tuple | None         # (file, line) of the source


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L\w+):")


def parse_sass(text: str):
    """Instructions in order and label -> address, from ``nvdisasm --print-line-info`` output."""
    out, labels, line, pending = [], {}, None, []
    for raw in text.splitlines():
        s = raw.strip()
        m = _LINE.search(s)
        if m:  # the first line of an inlined stack is the innermost source position
            if not s.startswith("//## File") or "inlined at" not in s:
                line = (m.group(1), int(m.group(2)))
            continue
        m = _LABEL.match(s)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(s)
        if m:
            ins = Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip(), line)
            for lab in pending:
                labels[lab] = ins.addr
            pending = []
            out.append(ins)
    return out, labels


def compile_sm90(fn, args: dict, num_warps: int, num_stages: int) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, const, attrs = specialize(fn, args)
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    tool, log = ptxas_v(k.asm["ptx"])
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    with tempfile.TemporaryDirectory() as d:
        cub = os.path.join(d, "k.cubin")
        with open(cub, "wb") as f:
            f.write(k.asm["cubin"])
        res = _run([os.path.join(tool_dir(), "cuobjdump"), "-res-usage", cub])
        dis = _run([os.path.join(tool_dir(), "nvdisasm"), "--print-line-info", cub])
    if dis.returncode != 0:
        raise RuntimeError("nvdisasm failed: " + dis.stderr[-500:])
    m = re.search(r"REG:(\d+)", res.stdout)
    regs = int(m.group(1)) if m else int(re.search(r"Used (\d+) registers", log).group(1))
    sass, labels = parse_sass(dis.stdout)
    c = Compiled(fn.__name__, tool, regs, stores, loads, int(k.metadata.shared), sass)
    c.labels = labels
    return c


# ---------------------------------------------------------------- SASS analysis

def load_bytes(op: str) -> int:
    """Bytes per thread of a global load opcode (LDG/LDGSTS/LD), 0 for anything else."""
    head = op.split(".")[0]
    if head not in ("LDG", "LDGSTS", "LD"):
        return 0
    mods = op.split(".")[1:]
    for w, b in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if w in mods:
            return b
    return 4


_REG = re.compile(r"\bR(\d+)(\.64)?\b")


def _regs(text: str) -> set:
    out = set()
    for m in _REG.finditer(text):
        n = int(m.group(1))
        out |= {n, n + 1} if m.group(2) else {n}
    return out


def _split_operands(ins: Instr):
    """(destination registers, source registers) of one instruction (first operand = destination)."""
    ops = [o.strip() for o in ins.operands.split(",")]
    head = ins.op.split(".")[0]
    if head.startswith(("ST", "RED", "BRA", "BAR", "EXIT", "RET", "CALL")) or head == "LDGSTS" or not ops:
        return set(), _regs(ins.operands) | _regs(ins.pred)
    dst = _regs(ops[0])
    if head in ("LDG", "LD", "LDS", "LDC", "ULDC"):
        width = load_bytes(ins.op) or 4
        if dst:
            r = min(dst)
            dst = set(range(r, r + max(1, width // 4)))
    return dst, _regs(",".join(ops[1:])) | _regs(ins.pred)


def loops(sass, labels):
    """[(start_index, end_index)] of every backward branch with a body (inclusive indices)."""
    idx = {ins.addr: i for i, ins in enumerate(sass)}
    out = []
    for i, ins in enumerate(sass):
        if ins.op.startswith("BRA"):
            m = re.search(r"\((\.L\w+)\)", ins.operands) or re.search(r"(\.L\w+)", ins.operands)
            if m and m.group(1) in labels and labels[m.group(1)] <= ins.addr:
                j = idx[labels[m.group(1)]]
                if i - j >= 2:  # not the trailing self-loop after EXIT
                    out.append((j, i))
    return out


@dataclass
class Load:
    index: int
    bytes: int      # per thread
    role: str
    name: str
    regs: set


def classify_loads(sass, roles: dict, source_lines) -> list:
    """Global loads with their role, by the pointer name that starts the ``tl.load(`` of their source line."""
    out = []
    for i, ins in enumerate(sass):
        b = load_bytes(ins.op)
        if not b:
            continue
        name = None
        if ins.line:
            text = source_lines(*ins.line)
            m = re.search(r"tl\.load\(\s*([A-Za-z_]\w*)", text or "")
            name = m.group(1) if m else None
        dst, _ = _split_operands(ins)
        out.append(Load(i, b, roles.get(name, "other"), name or "?", dst))
    return out


def exposures(sass, body: tuple, loads: list, dram_roles=("weight", "meta"), passes: int = 4) -> float:
    """Latency exposures per iteration of a loop body, for one warp in steady state.

    The body is replayed ``passes`` times in issue order. A wait happens at the first instruction that
    reads (or overwrites) a register of an outstanding load; it retires that load and every older one.
    A wait on a DRAM load issued ``j`` iterations earlier counts 1/(j+1) (that load had j iterations to
    arrive), counted in the last pass. ``LDGSTS`` (cp.async) groups close at ``LDGDEPBAR`` and retire at
    ``DEPBAR.LE SB0, n`` (at most n groups left in flight).
    """
    start, end = body
    by_index = {ld.index: ld for ld in loads}
    total = 0.0
    outstanding = []   # (seq, pass, Load)
    groups, open_group = [], []   # cp.async: lists of (pass, Load)
    seq = 0
    for p in range(passes):
        for i in range(start, end + 1):
            ins = sass[i]
            dst, src = _split_operands(ins)
            touched = src | dst
            hit = [o for o in outstanding if o[2].regs & touched]
            if hit:
                last = max(o[0] for o in hit)
                done = [o for o in outstanding if o[0] <= last]
                if p == passes - 1:
                    waits = [o for o in done if o[2].role in dram_roles]
                    if waits:
                        total += max(1.0 / (p - o[1] + 1) for o in waits)
                outstanding = [o for o in outstanding if o[0] > last]
            if ins.op.startswith("LDGDEPBAR"):
                groups.append(open_group)
                open_group = []
            elif ins.op.startswith("DEPBAR"):
                m = re.search(r"SB0,\s*(\d+)", ins.operands)
                keep = int(m.group(1)) if m else 0
                while len(groups) > keep:
                    g = groups.pop(0)
                    if p == passes - 1 and any(ld.role in dram_roles for _, ld in g):
                        total += max(1.0 / (p - gp + 1) for gp, _ in g)
            if i in by_index:
                ld = by_index[i]
                if ins.op.startswith("LDGSTS"):
                    open_group.append((p, ld))
                else:
                    outstanding.append((seq, p, ld))
                    seq += 1
    return total


def source_reader():
    cache = {}

    def read(path, line):
        if path not in cache:
            try:
                with open(path) as f:
                    cache[path] = f.read().splitlines()
            except OSError:
                cache[path] = []
        lines = cache[path]
        return lines[line - 1] if 0 < line <= len(lines) else None
    return read


def _key(fn, args, num_warps, num_stages):
    sig, const, attrs = specialize(fn, args)
    return (fn.__name__, id(fn), tuple(sig.items()), tuple(sorted((k, repr(v)) for k, v in const.items())),
            tuple(sorted(attrs)), num_warps, num_stages)


def analyze_kernel(fn, args: dict, num_warps: int, num_stages: int, roles: dict, cache: dict) -> dict:
    """SASS statistics of one launch (compiled once per specialization in ``cache``).

    Loops: each weight tensor (role 'weight') is attributed to the loop that loads most of its bytes per
    iteration; the *main loop* is the one that loads the largest weight tensor. A kernel without loops is
    one pseudo-loop (one iteration per program).
    """
    key = _key(fn, args, num_warps, num_stages)
    if key in cache:
        return cache[key]
    c = compile_sm90(fn, args, num_warps, num_stages)
    sass = c.sass
    loads = classify_loads(sass, roles, source_reader())
    spans = loops(sass, c.labels) or [(0, len(sass) - 1)]
    in_loop = set()
    owner = {}
    for n, (s, e) in enumerate(sorted(spans, key=lambda x: x[1] - x[0], reverse=True)):
        for i in range(s, e + 1):  # innermost wins: shorter spans written last
            owner[i] = (s, e)
            in_loop.add(i)
    size = {n: v.nbytes for n, v in args.items() if isinstance(v, Ptr)}
    info = {}
    for s, e in spans:
        instr = sum(1 for i in range(s, e + 1) if owner.get(i) == (s, e) and not sass[i].op.startswith("NOP"))
        per = {}
        for ld in loads:
            if owner.get(ld.index) == (s, e) and ld.role == "weight":
                t = per.setdefault(ld.name, {"bytes": 0, "b128": 0})
                t["bytes"] += ld.bytes * 32
                t["b128"] += ld.bytes * 32 if ld.bytes == 16 else 0
        info[(s, e)] = {"instr": instr, "per_tensor": per}
    home = {}  # weight tensor -> its loop
    for (s, e), d in info.items():
        for name, t in d["per_tensor"].items():
            if name not in home or t["bytes"] > info[home[name]]["per_tensor"][name]["bytes"]:
                home[name] = (s, e)
    total_w = sum(size.get(n, 0) for n in home) or 1
    out_loops, main, main_key = [], None, None
    if home:
        main_key = home[max(home, key=lambda n: size.get(n, 0))]
    for sp, d in info.items():
        mine = [n for n in home if home[n] == sp]
        wb = sum(d["per_tensor"][n]["bytes"] for n in mine)
        lp = {"start": hex(sass[sp[0]].addr), "end": hex(sass[sp[1]].addr), "instr": d["instr"],
                  "weight_bytes_per_warp": wb, "tensor_bytes_per_warp": {n: d["per_tensor"][n]["bytes"] for n in mine},
                  "b128": sum(d["per_tensor"][n]["b128"] for n in mine),
                  "exposures": round(exposures(sass, sp, loads), 3) if wb else 0.0}
        out_loops.append(lp)
        if sp == main_key:
            main = lp
    straight = sum(1 for i, ins in enumerate(sass) if i not in in_loop and not ins.op.startswith("NOP"))
    widths = {}
    for ld in loads:
        r = widths.setdefault(ld.role, {})
        r[str(ld.bytes * 8)] = r.get(str(ld.bytes * 8), 0) + 1
    w128 = sum(size.get(n, 0) * info[home[n]]["per_tensor"][n]["b128"] / info[home[n]]["per_tensor"][n]["bytes"]
               for n in home) / total_w if home else None
    xs = [ld for ld in loads if ld.role == "x" and (main_key is None or owner.get(ld.index) == main_key)]
    xv = sum(ld.bytes for ld in xs if ld.bytes >= 8) / sum(ld.bytes for ld in xs) if xs else None
    st = {"ptxas": c.ptxas, "registers": c.registers, "spill_stores": c.spill_stores, "spill_loads": c.spill_loads,
              "shared_bytes": c.shared_bytes, "cp_async": any(ins.op.startswith("LDGSTS") for ins in sass),
              "roles": roles, "loops": out_loops, "main": main,
              "straight_instr": straight if loops(sass, c.labels) else 0,
              "weight_128_share": None if w128 is None else round(w128, 3),
              "main_weight_128_share": round(main["b128"] / main["weight_bytes_per_warp"], 3) if main else None,
              "x_vector_share": None if xv is None else round(xv, 3), "load_widths": widths,
              "unattributed": sum(1 for ld in loads if ld.role == "other")}
    cache[key] = st
    return st
