"""Where the generation engine's CPU time goes: `benchmarks/generation.py --profile`."""

from __future__ import annotations

from caiflow.generation import GenerationEngine, Sampling

# The packed linear layers' product (caiflow.packed); the profiler counts no FLOPs for it.
PACKED_OP = "mkldnn::_linear_pointwise"
# Self-time groups, by profiler op name; the rest (norms, activations, rotary embeddings, the
# sampler, cache surgery, Python-side ops) is "other".
GEMM_OPS = ("aten::mm", "aten::addmm", PACKED_OP)
# Batched products are attention's: the decode step's two products on the key/value heads
# (caiflow.cpu_kernels.decode_attention); the linear layers run 2-D products.
ATTENTION_OPS = ("scaled_dot_product", "aten::bmm", "aten::baddbmm")


def packed_flops(event) -> float:
    """FLOPs of one shape group of packed products: 2 x rows x in x out per call."""
    if event.key != PACKED_OP or len(event.input_shapes) < 2:
        return 0.0
    (rows, inputs), (outputs, _) = event.input_shapes[0][-2:], event.input_shapes[1]
    return 2.0 * rows * inputs * outputs * event.count


def profile_engine(engine: GenerationEngine, prompts: list[str], sampling: Sampling) -> dict[str, float]:
    """One engine run under torch.profiler: self CPU seconds in matrix products, in attention and in
    everything else, with the tokens generated and the matrix products' GFLOP.

    The matrix products are the floor of this precision: tokens / their seconds is the engine's rate
    if every other op were free (the profiler adds a little overhead to the small ops, none to GEMMs).
    """
    from torch.profiler import ProfilerActivity, profile

    engine.generated_tokens = 0
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        engine.generate_text(prompts, sampling, list(range(len(prompts))))
    seconds = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    gemm_flops = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in GEMM_OPS:
            group = "gemm"
            gemm_flops += event.flops or packed_flops(event)
        elif any(op in event.key for op in ATTENTION_OPS):
            group = "attention"
        else:
            group = "other"
        seconds[group] += event.self_cpu_time_total / 1e6
    return {**seconds, "tokens": float(engine.generated_tokens), "gemm_gflops": gemm_flops / 1e9}
