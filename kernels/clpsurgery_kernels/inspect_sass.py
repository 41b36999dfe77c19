"""Compile the combine kernel for Hopper (sm_90) without a GPU and print what costs no device time:
registers, stack, shared and local memory (spills), and the instruction mix of the SASS (load and
store widths, FFMA, shuffles, barriers). Uses the ptxas and cuobjdump that Triton's wheel carries.

    python kernels/clpsurgery_kernels/inspect_sass.py            # the default configs and a few of the sweep's

Checked with triton 3.9 (ASTSource's signature and attrs formats have moved between versions).
"""

from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from clpsurgery_kernels.combine import _combine_kernel, default_config

POINTERS = ("src_ptr", "idx_ptr", "w_ptr", "out_ptr")
# Arguments Triton sees divisible by 16 in the BLOOM-scale launch (k = 64; with k = 10, K and the
# index/weight row strides are not).
DIVISIBLE = ("M", "H", "stride_src", "stride_out")
OPS = ("LDG", "LDGSTS", "LDS", "STG", "STS", "LDL", "STL", "SHFL", "BAR", "FFMA", "PRMT")


def compile_for_sm90(config: dict, dtype: str = "bf16", k_divisible: bool = True):
    fn = _combine_kernel
    names = list(inspect.signature(fn.fn).parameters)
    constexprs = {"BLOCK_M": config["block_m"], "BLOCK_H": config["block_h"], "BLOCK_K": config["block_k"], "H_MAJOR": config["h_major"], "NUM_STAGES": config["num_stages"]}
    signature = {name: ("constexpr" if name in constexprs else "i32") for name in names}
    signature.update({"src_ptr": f"*{dtype}", "idx_ptr": "*i32", "w_ptr": "*fp32", "out_ptr": f"*{dtype}"})
    divisible = set(POINTERS + DIVISIBLE + (("K", "stride_idx", "stride_w") if k_divisible else ()))
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]})


def sass_facts(compiled) -> tuple[dict, dict]:
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", f.name], check=False, capture_output=True, text=True).stdout
        sass = subprocess.run([str(tools / "cuobjdump"), "--dump-sass", f.name], check=False, capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    resources = {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    ops: collections.Counter = collections.Counter()
    for line in sass.splitlines():
        found = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if found and found.group(1).startswith(OPS):
            ops[found.group(1)] += 1
    return resources, dict(sorted(ops.items()))


def main() -> None:
    h, elem = 4096, 2
    cases = [
        ("default, k=64", default_config(h, 64, elem), True),
        ("default, k=10", default_config(h, 10, elem), False),
        ("default, k=50", default_config(h, 50, elem), False),
        ("k8", {**default_config(h, 64, elem), "block_k": 8}, True),
        ("m32 w8", {**default_config(h, 64, elem), "block_m": 32, "num_warps": 8}, True),
        ("stages 2", {**default_config(h, 64, elem), "num_stages": 2}, True),
    ]
    for label, config, k_divisible in cases:
        resources, ops = sass_facts(compile_for_sm90(config, k_divisible=k_divisible))
        print(f"{label:24s} {resources}  {ops}")


if __name__ == "__main__":
    main()
