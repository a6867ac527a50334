"""What a run will do, worked out before any weight is loaded, without torch (an import-linter
contract keeps it so): `plan` and config validation run in milliseconds.

    schedule.py    one MagCache set-up per request (ratio table, timesteps, threshold, plan)
    layouts.py     every layout of N GPUs (dp x cfg x ring x ulysses, FSDP) priced and ranked
    perf_model.py  the roofline model those prices come from (a model, not a measurement)
    memory.py      which module sits on the GPU when (the official offload policy)
"""
