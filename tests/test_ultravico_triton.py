"""The fused decay-rule Triton kernel with UltraViCo's rule, run by Triton's CPU interpreter against the float64
reference of UltraViCo attention.

The interpreter needs TRITON_INTERPRET=1 before Triton is imported, so the check runs in a subprocess.
On a GPU, benchmarks/ultravico.py checks the compiled kernel the same way.
"""

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import torch, triton
    from diffusers_attn_ext.kernels import decay_triton as dt
    from diffusers_attn_ext.masks import ExtrapolationWindow, ultravico_reference, ultravico_rule

    # (tokens per frame, trained frames, frames, BLOCK_M, BLOCK_N, first-frame rule, head dim): partial last
    # blocks, a 2-frame window, the rule off, blocks smaller than a frame, and the shipped 128x128 tiles at d 128.
    for frame, train, frames, bm, bn, restrict, dim in [
        (37, 3, 8, 64, 32, True, 64), (36, 2, 8, 32, 32, True, 64), (37, 3, 8, 64, 32, False, 64),
        (16, 4, 12, 32, 16, True, 64), (50, 3, 10, 128, 128, True, 128),
    ]:
        w = ExtrapolationWindow(frame, train, 0, frame * frames)
        n, heads = w.video_tokens, 2
        g = torch.Generator().manual_seed(frame + train)
        q, k, v = (torch.randn(2, n, heads, dim, generator=g) for _ in range(3))
        config = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1)
        out = dt.launch_decay(q, k, v, ultravico_rule(w, 0.7, restrict_first_frame=restrict), config=config)
        ref = ultravico_reference(q, k, v, w, 0.7, restrict_first_frame=restrict)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (frame, train, frames, bm, bn, restrict, err)
    print("ok")
    """
)


def test_kernel_matches_reference_in_interpreter(interpreter_env):
    env = interpreter_env
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
