"""magcache-launch: Wan2.2 video generation on one GPU or many, with rank-synchronized MagCache.

The folder tree is the architecture; each layer imports only those below it (pyproject.toml's
import-linter contracts, checked by scripts/test.sh):

    cli.py          the Typer commands; bad input -> one line, exit 2 (one place)
    serve/          the HTTP server: API process, job store, the rank loop in step, heartbeat
    batch/          many prompts, one model load: items, resume, dp replicas, summary
    engine/         a run: the lifecycle every model-loading command uses (lifecycle.open_engine),
                    the World of ranks, placement, model assembly, the session
    quality/        `compare`: PSNR, SSIM, flicker, LPIPS between two outputs (beside engine/)
    planner/        torch-free: one MagCache set-up per request, the layout planner, GPU residency
    outputs/        files that appear whole (atomic), media, manifest, console report
    config.py       flags -> a validated RunConfig      checkpoint/  find, validate, load weights
    wan/            the Wan2.2 model: tasks, text encoder, VAE, DiT forward, solvers, pipeline,
                    and `parallelize_wan`, the one step that makes it parallel
    signals.py      SIGTERM/SIGINT handlers, held during teardown
    options.py      every flag declared once, with its role      errors.py    exit-code exceptions

`magcache/` (the cache rule) and `parallel/` (meshes and collectives) never import this package.
Facts about the official pipeline that the code reproduces: docs/pipeline_facts.md.
"""
