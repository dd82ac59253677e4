"""The GPU check's parts, run by ``benchmarks/gpu_check.py`` (its docstring says what each measures):

    common.py      sizes and plans, model and tokenizer builders, device helpers, Clock, Report
    throughput.py  1.  engine against batched model.generate, and the interleaved timing harness
    diagnose.py    1b. why the engine is slower (--diagnose)
    memory.py      2.  peak memory of a 7B-shaped pipeline next to caiflow.memory's plan

Imported as ``gpu`` (benchmarks/ is on sys.path when a script under it runs), so these modules import
only torch, numpy, transformers, tokenizers, peft and caiflow, as the check itself does.
"""
