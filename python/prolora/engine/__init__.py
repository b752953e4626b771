"""The engine: streams the layer jobs of one or many LoRAs through one pass over the two base
models, under host and device memory budgets. Read in the order the data flows:

    planner   which modules compute together (chunks) and which LoRAs share a pass
    loader    reads a chunk's weights and cached bases in a background thread (read_ahead)
    device    GPU runs: pinned staging, the copy and back streams, events, worker threads
    bases     top-k bases from the cache or the truncated_svd op, kept on the compute device
    writer    GPU runs: cache entries copied back on a side stream, written by a thread
    runner    per module: similarity -> projection of every LoRA on it -> finished layers
    results   one layer job through the method; parking, alpha convention, the layer's record
    memory    the governor: resident memory, the budget, trimming the heap near it
The LoRA jobs (prolora.jobs: extract) run their passes on the same planner, loader and governor.
"""
from .bases import BasisProvider
from .memory import current_rss, default_budget, peak_rss, release_free_memory
from .planner import chunk_modules, lora_passes, module_bytes
from .results import JobResult, LoraTask, finalize, run_job
from .runner import Engine, EngineStats

__all__ = ["BasisProvider", "Engine", "EngineStats", "JobResult", "LoraTask", "chunk_modules", "current_rss",
           "default_budget", "finalize", "lora_passes", "module_bytes", "peak_rss", "release_free_memory",
           "run_job"]
