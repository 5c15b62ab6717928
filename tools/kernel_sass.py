"""Compile one Triton kernel for sm_90 without a GPU and read its SASS (helper of ``kernel_static.py``).

- :func:`specialize` turns launch arguments into the ``signature``/``constexprs``/``attrs`` of a
  ``triton.compiler.ASTSource`` with the rules of Triton's launcher (the only Triton-specific part);
- :func:`compile_sm90` compiles it, reruns the wheel's ``ptxas -v`` on the PTX (spills) and reads the
  cubin's resources (``cuobjdump -res-usage``) and SASS (``cuobjdump -sass``);
- :func:`analyze_kernel` finds loops (a backward ``BRA``), ties every global load to the pointer
  parameter its address comes from (register dataflow from the constant bank, so it does not depend on
  line info, which Triton 3.9 moves to the first use), and counts per loop iteration how often a warp
  waits for a DRAM load it issued (latency exposures).
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


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^(\.L\w+):")


def parse_sass(text: str):
    """Instructions in order and label -> address (``cuobjdump -sass`` or ``nvdisasm`` output)."""
    out, labels, pending = [], {}, []
    for raw in text.splitlines():
        s = raw.strip()
        m = _LABEL.match(s)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(s)
        if m:
            ins = Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip())
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
        dis = _run([os.path.join(tool_dir(), "cuobjdump"), "-sass", cub])
    if dis.returncode != 0:
        raise RuntimeError("cuobjdump -sass failed: " + dis.stderr[-500:])
    m = re.search(r"REG:(\d+)", res.stdout)
    regs = int(m.group(1)) if m else int(re.search(r"Used (\d+) registers", log).group(1))
    sass, labels = parse_sass(dis.stdout)
    c = Compiled(fn.__name__, tool, regs, stores, loads, int(k.metadata.shared), sass)
    c.labels = labels
    c.offsets = param_offsets(sig, k.asm["ptx"])
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
            m = re.search(r"(\.L\w+)", ins.operands)
            h = re.search(r"\b0x([0-9a-f]+)\b", ins.operands)
            target = labels.get(m.group(1)) if m else int(h.group(1), 16) if h else None
            if target is not None and target <= ins.addr and target in idx:
                j = idx[target]
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


PARAM_BASE = 0x210  # kernel parameters start at c[0x0][0x210] on sm_90
_CONST = re.compile(r"c\[0x0\]\[(0x[0-9a-f]+)\]")
_ANY_REG = re.compile(r"\b(U?R)(\d+)(\.64)?\b")
_PTX_PARAM = re.compile(r"\.param\s+\.([usbf])(\d+)")


def param_offsets(sig: dict, ptx: str) -> dict:
    """c-bank byte offset -> argument name of every pointer parameter (from the PTX entry's parameter list:
    the non-constexpr arguments in order, each aligned to its size)."""
    head = ptx[ptx.index(".entry"):]
    head = head[:head.index(")")]
    sizes = [int(m.group(2)) // 8 for m in _PTX_PARAM.finditer(head)]
    names = [n for n, t in sig.items() if t != "constexpr"]
    out, off = {}, PARAM_BASE
    for name, size in zip(names, sizes):
        off = -(-off // size) * size
        if sig[name].startswith("*"):
            for b in range(off, off + size):
                out[b] = name
        off += size
    return out


def _dep_regs(text: str, wide: bool = False) -> set:
    out = set()
    for m in _ANY_REG.finditer(text):
        n = int(m.group(2))
        out.add((m.group(1), n))
        if m.group(3) or wide:
            out.add((m.group(1), n + 1))
    return out


def pointer_sources(sass, spans, offsets: dict) -> dict:
    """Instruction index of every global load -> the pointer parameters its address derives from.

    Forward dataflow over registers (R and UR): a result depends on the pointer parameters read from the
    constant bank by its sources; a loaded value depends on none (data, not address). Straight-line order,
    each loop body walked twice (loop-carried addresses); predicated writes add to the old value.
    """
    deps: dict = {}
    out: dict = {}
    ends = {}
    for s, e in spans:
        ends.setdefault(e, []).append(s)

    def step(i):
        ins = sass[i]
        ops = [o.strip() for o in ins.operands.split(",")] if ins.operands else []
        head = ins.op.split(".")[0]
        wide = ".WIDE" in ins.op
        if load_bytes(ins.op):
            addr = ins.operands[ins.operands.rfind("["):] if "[" in ins.operands else ""
            src = set()
            for r in _dep_regs(addr):
                src |= deps.get(r, set())
            for m in _CONST.finditer(addr):
                src |= {offsets[int(m.group(1), 16)]} if int(m.group(1), 16) in offsets else set()
            out[i] = out.get(i, set()) | src
            if head != "LDGSTS" and ops:
                n = min((r for r in _dep_regs(ops[0])), default=None)
                if n is not None:
                    for k in range(max(1, (load_bytes(ins.op) or 4) // 4)):
                        deps[(n[0], n[1] + k)] = set()
            return
        if not ops or head.startswith(("ST", "RED", "BRA", "BAR", "EXIT", "RET", "CALL", "ISETP", "FSETP")):
            return
        src = set()
        for k, o in enumerate(ops[1:], 1):  # IMAD.WIDE's addend (last operand) is a register pair
            for r in _dep_regs(o, wide and k == len(ops) - 1):
                src |= deps.get(r, set())
        for m in _CONST.finditer(",".join(ops[1:])):
            off = int(m.group(1), 16)
            if off in offsets:
                src.add(offsets[off])
        dst = _dep_regs(ops[0], wide or ".64" in ins.op.split("."))
        for r in dst:
            deps[r] = (deps.get(r, set()) | src) if ins.pred else src

    i = 0
    while i < len(sass):
        step(i)
        for s in ends.get(i, []):
            for j in range(s, i + 1):
                step(j)
        i += 1
    return out


def classify_loads(sass, roles: dict, sources: dict) -> list:
    """Global loads with their role: that of the one pointer parameter their address derives from."""
    out = []
    for i, ins in enumerate(sass):
        b = load_bytes(ins.op)
        if not b:
            continue
        ptrs = sources.get(i, set())
        name = next(iter(ptrs)) if len(ptrs) == 1 else "?"
        dst, _ = _split_operands(ins)
        out.append(Load(i, b, roles.get(name, "other"), name, dst))
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
    real = loops(sass, c.labels)
    loads = classify_loads(sass, roles, pointer_sources(sass, real, c.offsets))
    spans = real or [(0, len(sass) - 1)]
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
                  # a kernel without loops is one pass per program: nothing carries over between passes
                  "exposures": round(exposures(sass, sp, loads, passes=4 if real else 1), 3) if wb else 0.0}
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
