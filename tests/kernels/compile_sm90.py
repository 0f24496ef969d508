"""Compile every kernel for sm_90 (TTIR -> PTX -> cubin with the ptxas shipped in the triton
wheel) without a GPU: catches errors of the compiled path that the interpreter lets through
(dot shapes, constexpr branches, dtype promotion). Run by test_compile.py in a subprocess,
since kernels decorated under TRITON_INTERPRET=1 cannot be compiled.
Usage: python compile_sm90.py [--all]"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile_(kernel, types: dict, consts: dict, cap=90):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name) or ("*i8" if name.endswith("_ptr") else "i32")
    src = ASTSource(fn=kernel, signature=sig, constexprs={k: v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", cap, 32))

from kvkit.kernels._sparse_decode import _sparse_decode_kernel
from kvkit.kernels._quant_decode import _quant_decode_kernel
from kvkit.kernels._lse_merge import _lse_merge_kernel
from kvkit.kernels._page_scores import _page_scores_kernel, _update_key_bounds_kernel
from kvkit.kernels._streaming_prefill import _streaming_prefill_kernel

ALL = "--all" in sys.argv
ok = 0
for dt in (["fp16", "bf16", "fp32"] if ALL else ["bf16", "fp32"]):
    upcast = dt == "fp32"
    for G, D in ([(1, 64), (4, 128), (8, 128)] if ALL else [(3, 64)]):
        t = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "table_ptr": "*i64", "lens_ptr": "*i32",
             "valid_ptr": "*u8", "mask_ptr": "*u8", "o_part_ptr": "*fp32", "lse_part_ptr": "*fp32",
             "scale_log2": "fp32"}
        c = dict(HKV=8, G=G, S=16, D=D, NUM_SPLITS=4, BLOCK_G=16, BLOCK_N=64, BLOCK_D=D, HAS_VALID=True,
                 HAS_MASK=True, UPCAST=upcast, EMU_BF16=False)
        compile_(_sparse_decode_kernel, t, c); ok += 1
        for kb, vb, rank in ([(8, 8, 0), (4, 4, 0), (4, 8, 4)] if ALL else [(4, 8, 4)]):
            t2 = {"q_ptr": f"*{dt}", "kc_ptr": "*i8" if kb == 8 else "*u8", "vc_ptr": "*i8" if vb == 8 else "*u8",
                  "ks_ptr": "*fp16", "kz_ptr": "*fp16", "vs_ptr": "*fp16", "vz_ptr": "*fp16",
                  "ka_ptr": "*fp32", "kb_ptr": "*fp32", "va_ptr": "*fp32", "vb_ptr": "*fp32",
                  "table_ptr": "*i64", "lens_ptr": "*i32", "valid_ptr": "*u8", "mask_ptr": "*u8",
                  "o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "scale_log2": "fp32"}
            c2 = dict(HKV=8, G=G, S=16, D=D, NUM_SPLITS=4, K_BITS=kb, K_TG=16 if kb == 4 else 1,
                      K_CG=1 if kb == 4 else D, K_ZERO=kb == 4, V_BITS=vb, V_TG=1, V_CG=32, V_ZERO=vb == 4,
                      K_RANK=rank, V_RANK=rank, BLOCK_R=16, BLOCK_G=16, BLOCK_N=64, BLOCK_D=D, HAS_VALID=True,
                      HAS_MASK=False, UPCAST=upcast, EMU_BF16=False)
            compile_(_quant_decode_kernel, t2, c2); ok += 1
        t3 = {n: f"*{dt}" for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
        t3.update({"stream_ptr": "*u8", "lens_ptr": "*i32", "scale_log2": "fp32"})
        compile_(_streaming_prefill_kernel, t3, dict(HQ=32, G=G, D=D, HAS_LENS=True, BLOCK_M=64, BLOCK_N=64,
                                                     BLOCK_D=D, UPCAST=upcast, EMU_BF16=False)); ok += 1
    compile_(_lse_merge_kernel, {"o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "out_ptr": f"*{dt}",
                                 "lse_ptr": "*fp32"}, dict(NUM_SPLITS=5, BLOCK_SPLITS=8, BLOCK_D=128, EMU_BF16=False))
    ok += 1
    if dt == "fp32" or ALL:
        compile_(_page_scores_kernel, {"q_ptr": f"*{dt}", "kmin_ptr": "*fp32", "kmax_ptr": "*fp32",
                                       "table_ptr": "*i64", "lens_ptr": "*i32", "forced_ptr": "*fp32",
                                       "out_ptr": "*fp32"},
                 dict(HKV=8, G=4, D=128, REDUCE=0, HAS_FORCED=True, BLOCK_P=32, BLOCK_D=128)); ok += 1
        compile_(_update_key_bounds_kernel, {"kmin_ptr": "*fp32", "kmax_ptr": "*fp32", "pages_ptr": "*i64",
                                             "k_ptr": f"*{dt}"}, dict(D=128, BLOCK_D=128)); ok += 1
print("compiled", ok, "kernel variants for sm_90")
