"""tools/kernel_static.py: the SASS properties of the Triton kernels for an H200, checked on CPU.

The kernels are compiled for sm_90 (no GPU needed) in a subprocess, because the interpreter flag the
other kernel tests set is process-wide. Properties today's kernels lack are strict xfails with the
reason: they turn into failures the day a kernel gains them, so the expectation gets updated.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import kernel_sass as ks
import kernel_static as kst

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
HAS_TOOLS = os.path.exists(os.path.join(BIN, "cuobjdump")) and any(
    os.path.exists(os.path.join(BIN, n)) for n in ("ptxas", "ptxas-blackwell"))
needs_tools = pytest.mark.skipif(not HAS_TOOLS, reason="this triton wheel has no ptxas/cuobjdump")
# compiles every kernel variant for sm_90 (minutes on 2 cores): CI runs it, a quick local run may skip it
pytestmark = pytest.mark.integration


def _tool(*args, timeout=600):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "kernel_static.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def rows():
    """The split-K kernels at 1 token on 4096x4096 (BN 128) at every bit width and on 4096x11008 (BN 256),
    the tensor-core one at 16 tokens, dequant at 3 bits (its widest loop body): 6 compilations."""
    out = []
    for args in (("--kernels", "splitk", "--shapes", "4096x4096", "--bits", "2,3,4", "--tokens", "1"),
                 ("--kernels", "splitk,splitk_dot", "--shapes", "4096x11008", "--bits", "4", "--tokens", "1,16"),
                 ("--kernels", "dequant", "--shapes", "4096x4096", "--bits", "3", "--tokens", "64")):
        r = _tool(*args)
        assert r.returncode == 0, r.stderr[-3000:]
        out += [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert {(x["kernel"], x["bits"], x["shape"]) for x in out} == {
        ("splitk", 2, "4096x4096"), ("splitk", 3, "4096x4096"), ("splitk", 4, "4096x4096"),
        ("splitk", 4, "4096x11008"), ("splitk_dot", 4, "4096x11008"), ("dequant", 3, "4096x4096")}
    return out


def _of(rows, kernel, **where):
    out = [r for r in rows if r["kernel"] == kernel and all(r[k] == v for k, v in where.items())]
    assert out, (kernel, where)
    return out


def _bn(r):
    return r["constexprs"]["BN"]


@needs_tools
@pytest.mark.parametrize("kernel", ["splitk", "splitk_dot", "dequant"])
def test_no_spills_and_packed_codes_loaded_128_bit(rows, kernel):
    for r in _of(rows, kernel):
        assert r["spills"] == 0, r
        assert r["main_weight_ldg_128_share"] == 1.0, r
        assert 0 < r["predicted_bw_share"] <= 1, r


@needs_tools
def test_dequant_loads_every_weight_byte_128_bit(rows):
    assert all(r["weight_ldg_128_share"] == 1.0 for r in _of(rows, "dequant"))


@needs_tools
def test_splitk_loads_every_weight_byte_128_bit(rows):
    """FP16 columns included: the tensor-core kernel, and the 1-token kernel with 256-column blocks."""
    wide = [r for r in _of(rows, "splitk") if _bn(r) == 256]
    assert wide
    assert all(r["weight_ldg_128_share"] == 1.0 for r in wide + _of(rows, "splitk_dot")), wide


@needs_tools
@pytest.mark.xfail(strict=True, reason="splitk with 128-column blocks (4096x4096 at 1 token): its [W, 128] FP16-column "
                                       "tiles are loaded with 64-bit loads")
def test_splitk_narrow_blocks_load_fp16_columns_128_bit(rows):
    narrow = [r for r in _of(rows, "splitk") if _bn(r) == 128]
    assert narrow and all(r["weight_ldg_128_share"] == 1.0 for r in narrow)


@needs_tools
def test_splitk_loads_x_as_vectors(rows):
    assert all(r["x_ldg_vector_share"] >= 0.5 for r in _of(rows, "splitk"))


@needs_tools
@pytest.mark.xfail(strict=True, reason="splitk_dot: the [16, 32*W] x tile is read with scalar 16-bit loads")
def test_splitk_dot_loads_x_as_vectors(rows):
    assert all(r["x_ldg_vector_share"] >= 0.5 for r in _of(rows, "splitk_dot"))


@needs_tools
@pytest.mark.parametrize("kernel", ["splitk", "splitk_dot"])
@pytest.mark.xfail(strict=True, reason="split-K: the weights come through cp.async (tl.range num_stages=2), but the "
                                       "main loop drains every group (DEPBAR.LE SB0, 0x0) and awaits plain LDGs of "
                                       "the tile's zero point (and scale) in the same iteration: 2.5-4 waits")
def test_splitk_issues_loads_ahead(rows, kernel):
    assert all(r["exposures_per_iter"] <= 1 for r in _of(rows, kernel))


@needs_tools
def test_splitk_fills_the_gpu_at_one_token_on_4096x11008(rows):
    assert all(r["programs_per_sm"] >= 8 for r in _of(rows, "splitk", shape="4096x11008"))


@needs_tools
@pytest.mark.xfail(strict=True, reason="splitk on 4096x4096: 32 column blocks x 32 K splits = 1024 programs (7.8 per "
                                       "SM); the split is capped by the 32 tiles of K = 4096")
def test_splitk_fills_the_gpu_at_one_token_on_4096x4096(rows):
    assert all(r["programs_per_sm"] >= 8 for r in _of(rows, "splitk", shape="4096x4096"))


def test_bad_input_is_one_line_and_exit_2():
    for args in (["--bits", "5"], ["--kernels", "nope"], ["--shapes", "4096by4096"]):
        r = _tool(*args, timeout=120)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert r.stderr.strip().startswith("kernel_static:") and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---------------------------------------------------------------- the analysis on hand-written SASS

def _sass(text):
    return ks.parse_sass(text)


LOOP = """
        /*0000*/                   LDC.64 R2, c[0x0][0x210] ;
        /*0010*/                   LDC.64 R4, c[0x0][0x218] ;
        /*0020*/                   IMAD.WIDE R6, R0, 0x4, R2 ;
        /*0030*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0040*/                   IMAD.WIDE R12, R0, 0x2, R4 ;
        /*0050*/                   LDG.E.U16 R14, desc[UR4][R12.64] ;
        /*0060*/                   FADD R20, R8, R14 ;
        /*0070*/                   LDG.E.128 R8, desc[UR4][R6.64+0x10] ;
        /*0080*/                   FADD R20, R9, R20 ;
        /*0090*/                   IADD3 R0, R0, 0x1, RZ ;
        /*00a0*/              @!P0 BRA 0x20 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0;
"""


def test_sass_loops_pointer_sources_and_exposures():
    sass, labels = _sass(LOOP)
    assert len(sass) == 13
    spans = ks.loops(sass, labels)
    assert spans == [(2, 10)]  # the self-loop after EXIT is not a loop
    offsets = ks.param_offsets({"w_ptr": "*i32", "x_ptr": "*fp16", "K": "i32"},
                               ".entry k(.param .u64 .ptr .global .align 1 k_param_0, .param .u64 k_param_1, "
                               ".param .u32 k_param_2)")
    src = ks.pointer_sources(sass, spans, offsets)
    assert src == {3: {"w_ptr"}, 5: {"x_ptr"}, 7: {"w_ptr"}}
    loads = ks.classify_loads(sass, {"w_ptr": "weight", "x_ptr": "x"}, src)
    assert [(ld.bytes, ld.role) for ld in loads] == [(16, "weight"), (2, "x"), (16, "weight")]
    # two waits on weight loads of the same iteration (the x wait is a cache hit: not counted)
    assert ks.exposures(sass, spans[0], loads) == 2.0


PREFETCH = """
        /*0000*/                   LDC.64 R2, c[0x0][0x210] ;
        /*0010*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0020*/                   FADD R20, R8, R20 ;
        /*0030*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0040*/              @!P0 BRA 0x20 ;
"""


def test_exposure_of_a_load_issued_one_iteration_ahead_counts_half():
    sass, labels = _sass(PREFETCH)
    spans = ks.loops(sass, labels)
    assert spans == [(2, 4)]
    loads = [ks.Load(3, 16, "weight", "w_ptr", {8, 9, 10, 11})]
    assert ks.exposures(sass, spans[0], loads) == 0.5


def test_load_widths():
    assert [ks.load_bytes(op) for op in ("LDG.E.128", "LDG.E.64", "LDG.E", "LDG.E.U16", "LDG.E.U8.CONSTANT",
                                         "LDGSTS.E.BYPASS.128", "LDS.128", "FADD")] == [16, 8, 4, 2, 1, 16, 0, 0]


def test_specialize_follows_the_launcher_rules():
    def body(a_ptr, b_ptr, m, n, s, B: triton.language.constexpr):
        pass

    k = triton.runtime.JITFunction(body, do_not_specialize=["n"])  # not triton.jit: the interpreter may be on
    sig, const, attrs = ks.specialize(k, {"a_ptr": ks.Ptr("fp16"), "b_ptr": ks.Ptr("i32"), "m": 32, "n": 1,
                                          "s": 1, "B": 4})
    assert sig == {"a_ptr": "*fp16", "b_ptr": "*i32", "m": "i32", "n": "i32", "s": "constexpr", "B": "constexpr"}
    assert const == {(4,): 1, (5,): 4}
    assert set(attrs) == {(0,), (1,), (2,)}  # pointers and m (divisible by 16); n is not specialized
    with pytest.raises(ks.KernelSpecError, match="missing"):
        ks.specialize(k, {"a_ptr": ks.Ptr("fp16")})


def test_model_is_memory_bound_when_bytes_dominate():
    c = kst.Case(4096, 4096, 4, 1)
    launch = kst.Launch({"w_ptr": ks.Ptr("i32", 8 << 20)}, (1056,), 4, bytes=c.read_bytes())
    loop = {"instr": 16, "weight_bytes_per_warp": 4096, "tensor_bytes_per_warp": {"w_ptr": 4096}, "exposures": 0.5}
    st = {"registers": 32, "shared_bytes": 0, "straight_instr": 10, "loops": [loop], "main": loop,
          "roles": {"w_ptr": "weight"}}
    p = kst.predict(c, launch, st)
    assert p["bound"] == "mem" and p["programs_per_sm"] == 8.0
    t_mem = c.read_bytes() / kst.COPY_BW
    assert p["predicted_bw_share"] == pytest.approx(t_mem / (t_mem + kst.LAUNCH_S), abs=1e-3)


def test_calibration_compares_the_whole_path():
    c = kst.Case(4096, 4096, 4, 16)
    row = {"us_fp16": 14.0, "us_triton_dequant": 28.0, "us_triton_gemv": 70.0, "copy_bw_GBs": 4000.0}
    deq = next(v for v in kst.VARIANTS if v.name == "dequant")
    out = kst.calibrate(deq, c, row, {"predicted_us": 10.0})
    assert out["predicted_path_us"] == 24.0 and out["measured_over_predicted"] == pytest.approx(28 / 24, abs=0.01)
    assert "measured_bw_share" not in out  # the pass was not timed alone
    dot = next(v for v in kst.VARIANTS if v.name == "splitk_dot")
    out = kst.calibrate(dot, c, row, {"predicted_us": 35.0})
    assert out["measured_over_predicted"] == 2.0 and out["measured_x_fp16"] == 0.2
    assert out["measured_bw_share"] == pytest.approx(c.read_bytes() / 70e-6 / 4e12, abs=1e-3)
    assert kst.calibrate(dot, c, None, {"predicted_us": 35.0}) == {}
